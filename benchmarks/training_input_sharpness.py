"""Are training inputs as sharp as prediction inputs? Mean gradient magnitude, paired crops.

Prediction resamples the smoothed scan once onto the stage grid and cuts whole-voxel crops from
it. Training cuts its crops from the cached stage volume (itself that one resampling) at the
augmented positions, so every training crop is resampled a second time. This benchmark measures
what the second resampling does to the input, with the augmentation reduced to its random
translation (no rotation, scaling, deformation or intensity change): for each crop it builds

* the reference: the smoothed scan resampled once, directly at the crop's (translated) physical
  points (SimpleITK, linear, as prediction does for its grid),
* the training crop as the training code cuts it (``samples.host_sample`` with a translation-only
  range, then ``samples.network_input``: cubic-convolution sampling, ``augmentation.apply_cubic``),
* the same crop sampled linearly (``augmentation.apply_linear``: the training path before the
  change),

and reports, per stage, the mean over crops of mean |gradient| (voxel units, image channel) of
each, and the ratios training / reference (1.0 = as sharp as prediction inputs)::

    python benchmarks/training_input_sharpness.py         # demo presets, 6 phantoms x 8 crops
    python benchmarks/training_input_sharpness.py --preset paper --cases 3 --crops 4
    python benchmarks/training_input_sharpness.py --quick # 2 x 2, written to a temp folder

Writes ``benchmarks/results/training_input_sharpness-<device>-<preset>-<date>.json`` (``--quick``: a
temporary folder).
"""

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks import common as bench
from experiments import trainer
from experiments.configs import scn, seg, spine
from verse_jax import io, phantoms, preprocessing, stages
from verse_jax.data import augmentation as aug
from verse_jax.data import cache as stage_cache
from verse_jax.data import samples
from verse_jax.geometry import Geometry, Volume

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"spine": spine, "scn": scn, "seg": seg}
SEED = 5150  # phantom seed no training run uses


def mean_gradient(crop: np.ndarray, inside: np.ndarray) -> float:
    """Mean |gradient| (central differences, voxel units) over the ``inside`` voxels."""
    grads = np.gradient(np.asarray(crop, np.float64))
    magnitude = np.sqrt(sum(g * g for g in grads))
    return float(magnitude[inside].mean()) if inside.any() else 0.0


def inside_scan(image: Volume, target: Geometry, margin: int = 2) -> np.ndarray:
    """Crop voxels at least ``margin`` voxels inside the scan (the edge of the field of view is a
    step to the outside value that any interpolation treats differently)."""
    ones = Volume(np.ones(image.geometry.size, np.uint8), image.geometry)
    inside = preprocessing.resample(ones, target, interpolation="nearest").array > 0
    inside = ndimage.binary_erosion(inside, iterations=margin, border_value=1)
    inside[[0, -1]] = inside[:, [0, -1]] = inside[:, :, [0, -1]] = False  # central differences
    return inside


def translation_only(spec):
    ranges = aug.AugmentRanges.none(spec.augment.control_points)
    ranges = dataclasses.replace(ranges, translation_mm=spec.augment.translation_mm)
    return dataclasses.replace(spec, augment=ranges)


def case_crops(case: io.Case, spec, crops: int, rng: np.random.Generator) -> list[dict]:
    image = io.read_volume(case.image_path)
    clamped = np.maximum(np.asarray(image.array, np.float32), np.float32(preprocessing.CT_MIN_HU))
    smoothed = preprocessing.smooth_mm(Volume(clamped, image.geometry), spec.smoothing_mm)
    arrays, meta = stage_cache._compute_arrays(case, spec)  # what the cache stores
    stage = stage_cache.StageCase(
        case_id=case.case_id,
        image=arrays["image"],
        labels=arrays.get("labels"),
        landmark_mask=arrays.get("landmark_mask"),
        landmarks_vox=np.asarray(meta["landmarks_vox"], np.float32).reshape(-1, 3),
        valid=np.asarray(meta["valid"], bool),
        geometry=Geometry(**meta["geometry"]),
    )
    size = samples.box_size(spec, [stage.image.shape], train=True)
    valid = np.flatnonzero(stage.valid)
    column_xy = stage.landmarks_vox[valid, :2].mean(axis=0) if spec.name == "scn" else None
    out = []
    for _ in range(crops):
        centroid = stage.landmarks_vox[rng.choice(valid)] if spec.name == "seg" else None
        center = stages.crop_center_vox(
            spec, stage.image.shape, column_xy_vox=column_xy, centroid_vox=centroid, rng=rng
        )
        params = aug.sample_params(rng, spec.augment)
        raw, start = samples._host_input(stage.image, spec, center, params, size, centroid)
        x, grid = samples.network_input(spec, raw)  # the training path
        grid = np.asarray(grid)
        cubic = np.asarray(x)[..., 0]
        linear = np.asarray(aug.apply_linear(raw["image"], grid))
        # Box voxel q is stage voxel q + start; translation only: the grid is regular.
        origin = stage.geometry.index_to_physical((grid[0, 0, 0] + start)[None])[0]
        target = Geometry(
            tuple(spec.crop_size), (spec.spacing_mm,) * 3, tuple(float(v) for v in origin)
        )
        once = preprocessing.resample(
            smoothed, target, interpolation="linear", default_value=preprocessing.CT_MIN_HU
        )
        reference = preprocessing.normalize_ct(once.array)
        inside = inside_scan(image, target)
        out.append(
            {
                "reference": mean_gradient(reference, inside),
                "cubic": mean_gradient(cubic, inside),
                "linear": mean_gradient(linear, inside),
                "cubic_max_abs_diff": float(np.abs(cubic - reference)[inside].max(initial=0)),
                "linear_max_abs_diff": float(np.abs(linear - reference)[inside].max(initial=0)),
            }
        )
    return out


def run(preset: str, num_cases: int, crops: int, *, quick: bool = False, out=None) -> dict:
    root = phantoms.default_dataset(
        Path(tempfile.gettempdir()) / f"verse-jax-sharpness-{num_cases}-{SEED}", num_cases, SEED
    )
    cases = io.find_cases(root)[:num_cases]
    rng = np.random.default_rng(0)
    report = {"preset": preset, "cases": num_cases, "crops_per_case": crops, "stages": {}}
    for name, module in CONFIGS.items():
        config = module.get_config(preset)
        spec = translation_only(trainer.stage_spec(config))
        rows = [row for case in cases for row in case_crops(case, spec, crops, rng)]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        summary = {
            "spacing_mm": spec.spacing_mm,
            "smoothing_mm": spec.smoothing_mm,
            "translation_mm": spec.augment.translation_mm,
            "mean_gradient": {k: mean[k] for k in ("reference", "cubic", "linear")},
            "ratio_cubic": mean["cubic"] / mean["reference"],
            "ratio_linear": mean["linear"] / mean["reference"],
            "max_abs_diff": {
                k: max(r[f"{k}_max_abs_diff"] for r in rows) for k in ("cubic", "linear")
            },
        }
        report["stages"][name] = summary
        print(
            f"{name:5s} {spec.spacing_mm:g} mm: |grad| reference {mean['reference']:.5f}  "
            f"training cubic {mean['cubic']:.5f} ({summary['ratio_cubic']:.3f})  "
            f"linear {mean['linear']:.5f} ({summary['ratio_linear']:.3f})",
            flush=True,
        )
    name = "quick" if quick else preset
    report = {**bench.header("training_input_sharpness", name), **report}
    path = bench.result_path("training_input_sharpness", name, quick=quick, out=out)
    print(f"wrote {bench.write_result(path, report, indent=2)}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=("demo", "paper"))
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--crops", type=int, default=8, help="crops per case and stage")
    parser.add_argument("--quick", action="store_true", help="2 cases x 2 crops, temp folder")
    parser.add_argument("--out", default=None, help="result JSON path")
    args = parser.parse_args(argv)
    if args.quick:
        run(args.preset, 2, 2, quick=True, out=args.out)
    else:
        run(args.preset, args.cases, args.crops, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
