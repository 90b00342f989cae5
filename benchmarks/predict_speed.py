"""One case through `verse-jax predict`, stage by stage, against each stage's pure network time.

Stages: read, preprocessing, spine stage (its network call apart), SCN sliding windows, candidates
+ sequence, segmentation crops, segmentation networks, fusion, write. The pipeline runs unchanged:
its functions are wrapped with timers (each result made ready) for the run. In the same run, after
each timed case, every network is timed alone on device-resident inputs of the shapes it saw (the
SCN: one window per call, times the windows), so that the overhead, total minus network time, is
reported as a fraction of the total, per stage and for the case. The first (compiling) pass is not
counted; each figure is the median over the rounds (case, networks alone, case, ...).

    python benchmarks/predict_speed.py --preset demo    # shipped demo bundle on a phantom
    python benchmarks/predict_speed.py --preset paper   # random paper bundle, 512x512x600 CT
    python benchmarks/predict_speed.py --quick          # tiny random bundle, tiny phantom

If the networks find no vertebra (random or placeholder weights), the segmentation stage is run on
the phantom's true centroids (or 17 points along the column for the paper CT) and marked so.
Writes `benchmarks/results/predict_speed-<device>-<preset>-<date>.json` (`--quick`: a temporary
folder).
"""

import argparse
import collections
import contextlib
import pathlib
import statistics
import tempfile
import time
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as bench
from verse_jax import cli, demo, io, phantoms, testing
from verse_jax.data import samples
from verse_jax.geometry import Geometry, Volume
from verse_jax.infer import bundle as bundle_lib
from verse_jax.infer import candidates, fusion, inputs, predict
from verse_jax.infer import sequence as sequence_lib
from verse_jax.infer import sliding_window as windows
from verse_jax.models import registry

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TINY_GRIDS = {
    "spine": {"spacing_mm": 16.0, "crop_size": (16, 16, 32), "smoothing_mm": 3.0},
    "scn": {"spacing_mm": 8.0, "crop_size": (12, 12, 16), "smoothing_mm": 0.75},
    "seg": {"spacing_mm": 4.0, "crop_size": (16, 16, 12), "smoothing_mm": 0.75},
}


class Recorder:
    """Seconds per stage name and the network inputs seen, filled by the wrapped functions."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.defaultdict(list)  # network -> input shapes
        self.section = None
        self.volumes = None
        self.scn_windows = 0

    def wrap(self, name, fn, section=None):
        def timed(*args, **kwargs):
            outer, self.section = self.section, section or self.section
            tic = time.perf_counter()
            try:
                out = jax.block_until_ready(fn(*args, **kwargs))
            finally:
                key = name(self.section) if callable(name) else name
                if key is not None:
                    self.seconds[key] += time.perf_counter() - tic
                self.section = outer
            return out

        return timed


@contextlib.contextmanager
def instrumented(rec: Recorder):
    """Timers around the pipeline's steps (module attributes; behaviour unchanged)."""
    apply_fn = registry.StageNetwork.apply_fn
    sliding_window = windows.sliding_window

    def timed_apply_fn(stage, transform=None):
        fn = apply_fn(stage, transform)

        def call(x):
            rec.calls[stage.stage].append(tuple(x.shape))
            return fn(x)

        return rec.wrap(f"{stage.stage} network", call)

    def timed_windows(apply, column, *, window_z, overlap_z, **kwargs):
        rec.scn_windows += windows.num_windows(
            column.shape[2], window_z=window_z, overlap_z=overlap_z
        )
        rec.calls["scn"].append((1, *column.shape[:2], window_z, column.shape[3]))
        return sliding_window(apply, column, window_z=window_z, overlap_z=overlap_z, **kwargs)

    def keep_volumes(fn):
        def call(*args):
            rec.volumes = fn(*args)
            return rec.volumes

        return call

    patches = [
        (registry.StageNetwork, "apply_fn", timed_apply_fn),
        (
            inputs,
            "stage_volumes",
            rec.wrap("preprocessing", keep_volumes(inputs.stage_volumes)),
        ),
        (predict, "predict_spine", rec.wrap("spine stage", predict.predict_spine, "spine")),
        (windows, "sliding_window", rec.wrap("scn windows", timed_windows)),
        (
            predict,
            "landmark_candidates",
            rec.wrap("candidates + sequence", candidates.landmark_candidates),
        ),
        (
            sequence_lib,
            "select_landmark_sequence",
            rec.wrap("candidates + sequence", sequence_lib.select_landmark_sequence),
        ),
        (
            predict,
            "fuse_segmentation",
            rec.wrap("segmentation stage", predict.fuse_segmentation, "seg"),
        ),
        (
            samples,
            "prediction_input",
            rec.wrap(lambda s: "seg crops" if s == "seg" else None, samples.prediction_input),
        ),
        (predict, "largest_component", rec.wrap("fusion", fusion.largest_component)),
        (predict, "fuse_crop", rec.wrap("fusion", fusion.fuse_crop)),
    ]
    with contextlib.ExitStack() as stack:
        for owner, attr, new in patches:
            stack.enter_context(mock.patch.object(owner, attr, new))
        yield rec


def make_case(args, tmp: pathlib.Path):
    """(bundle, CT path, true centroids or None, description) of the preset."""
    if args.preset == "paper":
        path = testing.random_bundle(tmp / "bundle", preset="paper", seed=0)
        rng = np.random.default_rng(0)
        ct = rng.normal(0.0, 300.0, (512, 512, 600)).astype(np.float32)
        geometry = Geometry((512, 512, 600), (0.8, 0.8, 1.0), (0.0, 0.0, 0.0))
        ct_path = tmp / "ct.nii.gz"
        io.write_volume(ct_path, Volume(ct, geometry))
        return bundle_lib.load_bundle(path), ct_path, None, "random CT 512x512x600, paper bundle"
    if args.preset == "quick":
        path = testing.random_bundle(
            tmp / "bundle", grids=TINY_GRIDS, seed=2, network_kwargs={"conv_impl": "lax"}
        )
        model, phantom = (
            bundle_lib.load_bundle(path),
            phantoms.generate_phantom(3, max_voxels=30000),
        )
    else:
        model, _ = demo.load_model(None)
        phantom = phantoms.generate_phantom(demo.DEMO_SEED, max_voxels=args.max_voxels)
    ct_path = tmp / "ct.nii.gz"
    io.write_volume(ct_path, phantom.image)
    trained = model.extra.get("trained")
    what = f"phantom {phantom.image.geometry.size}, {args.preset} bundle (trained: {trained})"
    return model, ct_path, phantom.centroids, what


def fallback_points(volume, centroids):
    """(points_mm, valid) for the segmentation when the networks found no vertebra."""
    if centroids is not None:
        points = np.zeros((25, 3))
        valid = np.zeros(25, bool)
        for label, point in zip(centroids.labels, centroids.points_mm, strict=True):
            points[int(label) - 1], valid[int(label) - 1] = point, True
        return points, valid, "phantom's true centroids"
    geom = volume.geometry
    centre = np.asarray(geom.size, np.float64) / 2
    idx = [centre + [0, 0, (k - 8) * 25.0 / geom.spacing_mm[2]] for k in range(17)]
    points = np.zeros((25, 3))
    points[7:24] = [geom.index_to_physical(i) for i in idx]
    return points, np.arange(25) >= 7, "17 points along the column"


def one_case(model, ct_path, centroids, out_dir: pathlib.Path) -> tuple[Recorder, dict]:
    """Read, predict and write one case with every step timed."""
    rec, info = Recorder(), {}
    tic = time.perf_counter()
    image = rec.wrap("read", io.read_volume)(ct_path)
    with instrumented(rec):
        try:
            result = predict.predict_case_details(image, model)
            info["vertebrae"] = int(len(result.centroids.labels))
        except predict.NoSpineFoundError as error:
            points, valid, info["segmentation_on"] = fallback_points(rec.volumes["seg"], centroids)
            info["no_vertebra_found"] = str(error)
            fused = predict.fuse_segmentation(
                rec.volumes["seg"], points, valid, model.seg, image.geometry
            )
            result = None
            info["vertebrae"] = int(valid.sum())
    tic_write = time.perf_counter()
    if result is not None:
        io.write_volume(out_dir / "case_seg.nii.gz", result.mask)
        io.write_centroids(out_dir / "case_ctd.json", result.centroids, image.geometry)
        options = types.SimpleNamespace(output_type="nifti")
        cli._write_case_extras("case", ct_path, out_dir, image, result, options)
    else:
        io.write_volume(out_dir / "case_seg.nii.gz", Volume(fused.labels, image.geometry))
    rec.seconds["write"] = time.perf_counter() - tic_write
    rec.seconds["total"] = time.perf_counter() - tic
    return rec, info


def network_seconds(model, rec: Recorder, repeats: int) -> dict:
    """Pure forward seconds of each stage's network calls of the run, on device-resident zeros."""
    out = {}
    for stage, transform, count in (
        ("spine", None, len(rec.calls["spine"])),
        ("scn", "heatmaps", rec.scn_windows),
        ("seg", "sigmoid", len(rec.calls["seg"])),
    ):
        if not rec.calls[stage]:
            out[stage] = 0.0
            continue
        fn = getattr(model, stage).apply_fn(transform)
        x = jax.device_put(jnp.zeros(rec.calls[stage][0], jnp.float32))
        jax.block_until_ready(fn(x))  # compiled already for the pipeline; warm again
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            jax.block_until_ready(fn(x))
            times.append(time.perf_counter() - tic)
        out[stage] = statistics.median(times) * count
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="demo", choices=["demo", "paper"])
    p.add_argument("--quick", action="store_true", help="tiny random bundle and phantom")
    p.add_argument("--max-voxels", type=int, default=2_000_000, help="demo phantom voxel budget")
    p.add_argument("--rounds", type=int, default=3, help="timed cases (medians reported)")
    p.add_argument("--repeats", type=int, default=3, help="timings of each network alone")
    p.add_argument("--out", default=None, help="result JSON path")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model, ct_path, centroids, what = make_case(args, tmp)
        one_case(model, ct_path, centroids, tmp)  # compiles; not counted
        runs = []
        for _ in range(args.rounds):  # case, networks alone, case, networks alone, ...
            rec, info = one_case(model, ct_path, centroids, tmp)
            runs.append((dict(rec.seconds), network_seconds(model, rec, args.repeats)))
    seconds = {k: statistics.median(r[0].get(k, 0.0) for r in runs) for k in runs[0][0]}
    nets = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
    net_of = {"spine stage": nets["spine"], "scn windows": nets["scn"]}
    net_of |= {"segmentation networks": nets["seg"]}
    stages = {
        "read": seconds.get("read", 0.0),
        "preprocessing": seconds.get("preprocessing", 0.0),
        "spine stage": seconds.get("spine stage", 0.0),
        "scn windows": seconds.get("scn windows", 0.0),
        "candidates + sequence": seconds.get("candidates + sequence", 0.0),
        "segmentation crops": seconds.get("seg crops", 0.0),
        "segmentation networks": seconds.get("seg network", 0.0),
        "fusion": seconds.get("fusion", 0.0),
        "write": seconds.get("write", 0.0),
    }
    rows = []
    for name, total in stages.items():
        net = net_of.get(name)
        row = {"stage": name, "seconds": total}
        if net is not None:
            row |= {
                "network_seconds": net,
                "overhead_fraction": (total - net) / total if total else None,
            }
        rows.append(row)
    total, network = seconds["total"], sum(nets.values())
    result = {
        **bench.header("predict_speed", args.preset, argv),
        "args": vars(args),
        "case": what,
        **info,
        "stages": rows,
        "rounds": [{"stages": r[0], "networks": r[1]} for r in runs],
        "spine_network_in_pipeline_s": seconds.get("spine network", 0.0),
        "segmentation_stage_s": seconds.get("segmentation stage", 0.0),
        "scn_windows": rec.scn_windows,
        "network_calls": {stage: len(rec.calls[stage]) for stage in ("spine", "scn", "seg")},
        "network_s_per_stage": nets,
        "total_s": total,
        "network_s": network,
        "overhead_fraction": (total - network) / total,
    }
    for row in rows:
        extra = ""
        if "network_seconds" in row:
            net, frac = row["network_seconds"], row["overhead_fraction"]
            extra = f"  network {net:8.3f} s  overhead {frac:.2f}"
        print(f"{row['stage']:<24} {row['seconds']:8.3f} s{extra}")
    print(
        f"{'total':<24} {total:8.3f} s  network {network:8.3f} s  "
        f"overhead {result['overhead_fraction']:.2f}"
    )
    out = bench.result_path("predict_speed", args.preset, quick=args.quick, out=args.out)
    print(f"wrote {bench.write_result(out, result)}")
    return result


if __name__ == "__main__":
    main()
