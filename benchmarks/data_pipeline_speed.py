"""Data pipeline speed: host samples/s, on-device augmentation, the SimpleITK way, a paper SCN step.

Per stage (paper grids and crops; phantom data written to a temporary folder):
  * host: raw samples/s of ``verse_jax.data.pipeline.make_train_dataset`` (context box + random
    numbers) with 0 (in process), 1, 2 and N worker processes, batch size 1;
  * device: time per batch of the jitted ``samples.make_device_transform`` (affine + B-spline grid,
    linear image, nearest masks, landmark inverse, heatmap channel), batch size 1;
  * baseline: the same augmentation done the original way, per sample on the CPU with SimpleITK
    (composite affine + B-spline transform baked into a displacement field on the output grid,
    linear resampling of the image, nearest of the mask), with the same parameters and box; its
    output is compared with the device output (max |difference| of the image, label agreement);
  * the paper SCN (``vertebrae_localization_net()``) forward + backward on 96 x 96 x 128, batch 1,
    on the same device, so augmentation is given as a fraction of a training step (skip: --quick
    or --no-step).

    python benchmarks/data_pipeline_speed.py           # paper sizes, several min
    python benchmarks/data_pipeline_speed.py --quick   # small sizes, < 1 min

Writes benchmarks/results/data_pipeline_speed-<device>-paper-<date>.json (--quick: a temporary
folder) and prints a table.
"""

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import SimpleITK as sitk

from benchmarks import common as bench
from verse_jax import io, phantoms, stages
from verse_jax.data import augmentation as aug
from verse_jax.data import pipeline as data_pipeline
from verse_jax.data import samples
from verse_jax.geometry import Geometry, Volume

RESULTS = Path(__file__).resolve().parent / "results"


def stage_specs(quick: bool) -> list[stages.StageSpec]:
    if not quick:
        return [stages.SPINE_PAPER, stages.SCN_PAPER, stages.SEG_PAPER]
    ranges = aug.AugmentRanges(translation_mm=10.0, displacement_mm=8.0)
    return [
        stages.StageSpec("spine", 16.0, (16, 16, 32), 3.0, augment=ranges),
        stages.StageSpec("scn", 8.0, (24, 24, 32), 1.0, augment=ranges),
        stages.StageSpec("seg", 4.0, (24, 24, 16), 1.0, augment=ranges),
    ]


def host_rate(root, ids, spec, cache, workers: int, batches: int) -> dict:
    """Samples/s of the host pipeline after its first batch (worker start-up timed apart)."""
    dataset = data_pipeline.make_train_dataset(
        root, ids, spec, cache_dir=cache, batch_size=1, seed=0, num_workers=workers
    )
    start = time.perf_counter()
    iterator = iter(dataset)
    raw = next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()
    return {"samples_per_s": batches / elapsed, "first_batch_s": first, "raw": raw}


def device_time(transform, raw, repeats: int) -> tuple[float, float, dict]:
    """(compile s, median s per batch, output) of the jitted transform on one raw batch."""
    start = time.perf_counter()
    compiled = jax.jit(transform).lower(raw).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(raw))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(raw))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), jax.tree.map(np.asarray, out)


def _sitk_transform(params: aug.AugmentParams, center_vox, spec) -> sitk.Transform:
    """Output mm -> box mm: A (p + d(p) - c_out) + center + t, as SimpleITK transforms."""
    s, size = spec.spacing_mm, np.asarray(spec.crop_size)
    bspline = sitk.BSplineTransform(3, 3)
    bspline.SetTransformDomainOrigin((0.0, 0.0, 0.0))
    bspline.SetTransformDomainPhysicalDimensions(tuple(float(v) for v in size * s))
    bspline.SetTransformDomainMeshSize([params.displacement_mm.shape[0] - 3] * 3)
    bspline.SetTransformDomainDirection((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    coefficients = [params.displacement_mm[..., d].ravel(order="F") for d in range(3)]
    bspline.SetParameters(tuple(np.concatenate(coefficients).astype(float)))
    matrix = aug.rotation_matrix(np.asarray(params.rotation_rad, np.float64), xp=np)
    matrix = matrix * np.asarray(params.scale, np.float64)[None, :]
    c_out = (size - 1) / 2 * s
    shift = np.asarray(center_vox, np.float64) * s + params.translation_mm - matrix @ c_out
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetTranslation(tuple(shift))
    return sitk.CompositeTransform([affine, bspline])  # the last one is applied first


def sitk_sample(raw: dict, spec, index: int = 0) -> tuple[float, dict]:
    """The original way for one sample: displacement field on the output grid, resampling."""
    params = aug.AugmentParams(**{k: np.asarray(v[index]) for k, v in raw["params"].items()})
    s = spec.spacing_mm
    box_geometry = Geometry(raw["image"].shape[1:], (s, s, s), (0.0, 0.0, 0.0))
    image = io.volume_to_sitk(Volume(np.asarray(raw["image"][index], np.float32), box_geometry))
    masks = {k: raw[k][index] for k in ("mask", "label") if k in raw}
    masks = {k: io.volume_to_sitk(Volume(v, box_geometry)) for k, v in masks.items()}
    start = time.perf_counter()
    composite = _sitk_transform(params, raw["center_vox"][index], spec)
    reference = sitk.Image([int(v) for v in spec.crop_size], sitk.sitkFloat32)
    reference.SetSpacing((s, s, s))
    field = sitk.TransformToDisplacementFieldFilter()
    field.SetReferenceImage(reference)
    field.SetOutputPixelType(sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field.Execute(composite))
    out = {"image": sitk.Resample(image, reference, transform, sitk.sitkLinear, -0.5)}
    for key, mask in masks.items():
        out[key] = sitk.Resample(mask, reference, transform, sitk.sitkNearestNeighbor, 0)
    out = {k: io.volume_from_sitk(v).array for k, v in out.items()}
    if "label" in out:  # the sample's vertebra
        out["label"] = out["label"] == raw["label_id"][index]
    shifted = (out["image"] + params.intensity_shift) * params.intensity_scale
    out["image"] = np.clip(shifted, -1, 1)
    return time.perf_counter() - start, out


def compare(device_out: dict, sitk_out: dict) -> dict:
    """Image difference and mask agreement, device vs SimpleITK, sample 0."""
    result = {
        "image_max_abs_diff": float(
            np.max(np.abs(device_out["image"][0, ..., 0] - sitk_out["image"]))
        ),
        "image_mean_abs_diff": float(
            np.mean(np.abs(device_out["image"][0, ..., 0] - sitk_out["image"]))
        ),
    }
    for key in ("mask", "label"):
        if key in sitk_out:
            agree = device_out[key][0, ..., 0] == sitk_out[key]
            result[f"{key}_agreement"] = float(np.mean(agree))
    return result


def scn_step_time() -> dict:
    """Paper SCN forward + backward, batch 1, 96 x 96 x 128 (compile timed apart)."""
    from verse_jax.models import vertebrae_localization_net

    net = vertebrae_localization_net()
    x = jnp.zeros((1, 96, 96, 128, 1), jnp.float32)
    variables = net.init(jax.random.key(0), x, train=False)

    def loss(params, x, rng):
        out = net.apply(params, x, train=True, rngs={"dropout": rng})
        return 0.5 * jnp.sum(out.heatmaps**2)

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    compiled = step.lower(variables, x, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, x, jax.random.key(1)))
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, x, jax.random.key(2)))
    return {"compile_s": compile_s, "step_s": time.perf_counter() - start}


def run_stage(root, ids, spec, cache, args) -> dict:
    start = time.perf_counter()
    _ = data_pipeline.make_train_dataset(root, ids, spec, cache_dir=cache, batch_size=1, seed=0)
    row = {"stage": spec.name, "spacing_mm": spec.spacing_mm, "crop_size": spec.crop_size}
    row["cache_s"] = time.perf_counter() - start  # once per case and stage, then on disk
    raw = None
    row["host"] = {}
    for workers in args.workers:
        result = host_rate(root, ids, spec, cache, workers, args.batches)
        raw = raw or result.pop("raw")
        result.pop("raw", None)
        row["host"][workers] = result
    row["box_size"] = list(raw["image"].shape[1:])  # worst case, capped at the largest volume
    row["worst_case_box_size"] = list(
        aug.context_box_size(spec.crop_size, spec.spacing_mm, spec.augment)
    )
    row["raw_bytes_per_sample"] = int(sum(np.asarray(v).nbytes for v in jax.tree.leaves(raw)))
    transform = samples.make_device_transform(spec)
    row["device_compile_s"], row["device_s_per_batch"], device_out = device_time(
        transform, raw, args.repeats
    )
    sitk_times = []
    for _ in range(args.repeats):
        elapsed, sitk_out = sitk_sample(raw, spec)
        sitk_times.append(elapsed)
    row["sitk_s_per_sample"] = statistics.median(sitk_times)
    row["sitk_over_device"] = row["sitk_s_per_sample"] / row["device_s_per_batch"]
    row["device_vs_sitk"] = compare(device_out, sitk_out)
    return row


def print_table(rows, step, workers) -> None:
    head = "stage  box (voxels)      MB/sample " + " ".join(f"host w={w:<2}" for w in workers)
    head += "  device ms  sitk ms  sitk/dev  img |diff|  % of SCN step"
    print(head)
    for row in rows:
        rates = " ".join(f"{row['host'][w]['samples_per_s']:9.1f}" for w in workers)
        fraction = f"{100 * row['device_s_per_batch'] / step['step_s']:.2f}" if step else "-"
        print(
            f"{row['stage']:<6} {'x'.join(map(str, row['box_size'])):<17} "
            f"{row['raw_bytes_per_sample'] / 1e6:9.1f} {rates}  "
            f"{1e3 * row['device_s_per_batch']:9.1f} {1e3 * row['sitk_s_per_sample']:8.1f} "
            f"{row['sitk_over_device']:8.2f}  {row['device_vs_sitk']['image_max_abs_diff']:.1e}"
            f"      {fraction}"
        )
    if step:
        print(f"paper SCN step (fwd+bwd, batch 1, 96x96x128): {step['step_s']:.1f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grids and data, < 1 min")
    parser.add_argument("--no-step", action="store_true", help="skip the paper SCN step")
    parser.add_argument("--cases", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.cases = args.cases or (2 if args.quick else 3)
    many = max(4, os.cpu_count() or 1)
    args.workers = [0, 2] if args.quick else [0, 1, 2, many]
    args.batches, args.repeats = (4, 2) if args.quick else (12, 3)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        max_voxels = 1_000_000 if args.quick else 8_000_000
        ids = phantoms.write_phantom_dataset(root, args.cases, seed=0, max_voxels=max_voxels)
        rows = [run_stage(root, ids, spec, cache, args) for spec in stage_specs(args.quick)]
    step = None if (args.quick or args.no_step) else scn_step_time()
    print_table(rows, step, args.workers)
    preset = "quick" if args.quick else "paper"
    result = {
        **bench.header("data_pipeline_speed", preset, argv),
        "cases": args.cases,
        "stages": [
            dataclasses.asdict(spec) | {"augment": None} for spec in stage_specs(args.quick)
        ],
        "rows": rows,
        "paper_scn_step": step,
    }
    out = bench.write_result(
        bench.result_path("data_pipeline_speed", preset, quick=args.quick, out=args.out), result
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
