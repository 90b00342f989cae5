"""Peak memory and time of `predict_case` on a 512 x 512 x 600 CT (0.8 x 0.8 x 1 mm) on the CPU.

The CT is a whole-spine phantom rendered at 2 mm and resampled onto the 512 x 512 x 600 grid in a
child process (so its generation does not count), written as uncompressed NIfTI, then read here.
The networks are a random paper-size bundle (`testing.random_bundle(preset="paper")`: the paper's
grids and crop sizes, 2.5 M / 6.1 M / 2.6 M parameters). One `predict_case` call is timed, so the
time includes compilation; peak memory is the process's peak RSS (`resource.getrusage`), which
includes JAX, the bundle and the input CT. Random networks usually find no anatomical sequence and
fall back to all 25 global maxima, so the segmentation stage runs 25 crops (a real whole-spine
scan has about 17-24 vertebrae).

    python benchmarks/predict_memory.py            # full size (paper networks: many minutes)
    python benchmarks/predict_memory.py --quick    # small phantom, tiny networks, coarse grids

Writes `benchmarks/results/predict_memory-<device>-paper-<date>.json` (`--quick`: a temporary
folder) and prints it.
"""

import argparse
import json
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common as bench

FULL = {"size": (512, 512, 600), "spacing_mm": (0.8, 0.8, 1.0)}
QUICK = {"size": (96, 96, 120), "spacing_mm": (2.0, 2.0, 2.5)}
QUICK_GRIDS = {
    "spine": {"spacing_mm": 16.0, "crop_size": (16, 16, 32), "smoothing_mm": 3.0},
    "scn": {"spacing_mm": 8.0, "crop_size": (12, 12, 16), "smoothing_mm": 0.75},
    "seg": {"spacing_mm": 4.0, "crop_size": (16, 16, 12), "smoothing_mm": 0.75},
}
RESULTS = Path(__file__).resolve().parent / "results"


def make_ct(path: Path, size, spacing_mm, seed: int) -> None:
    """Whole-spine phantom at 2 mm, resampled (linear, -1024 HU outside) onto the target grid."""
    from verse_jax import io, phantoms, preprocessing
    from verse_jax.geometry import Geometry

    phantom = phantoms.generate_phantom(
        seed, fov="whole", spacing_mm=(2.0, 2.0, 2.0), orientation="RAS", noise_hu=20.0
    )
    center = phantom.image.geometry.corners_mm().mean(axis=0)
    lps = Geometry.axis_aligned(center, size, spacing_mm)
    # The same voxel centres in RAS index order (as most CT NIfTIs): index 0 at (x max, y max).
    origin = lps.index_to_physical((size[0] - 1, size[1] - 1, 0))
    ras = Geometry(size, spacing_mm, tuple(origin), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    image = preprocessing.resample(phantom.image, ras, default_value=-1024.0)
    io.write_volume(path, image)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run(args) -> dict:
    from verse_jax import io, testing
    from verse_jax.infer import bundle, predict

    spec = QUICK if args.quick else FULL
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="predict_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    ct_path = work / f"ct-{'x'.join(map(str, spec['size']))}.nii"
    tic = time.perf_counter()
    if not ct_path.exists():
        subprocess.run(
            [sys.executable, __file__, "--make-ct", str(ct_path), "--seed", str(args.seed)]
            + (["--quick"] if args.quick else []),
            check=True,
        )
    make_s = time.perf_counter() - tic
    preset = "tiny" if args.quick else "paper"
    bundle_dir = work / f"bundle-{preset}"
    if not bundle_dir.exists():
        testing.random_bundle(bundle_dir, preset=preset, grids=QUICK_GRIDS if args.quick else None)
    model = bundle.load_bundle(bundle_dir)
    rss_model = current_rss_gib()
    image = io.read_volume(ct_path)
    rss_ct = current_rss_gib()
    records = _Records()
    logging.getLogger("verse_jax.infer.predict").addHandler(records)
    logging.getLogger("verse_jax.infer.predict").setLevel(logging.INFO)
    tic = time.perf_counter()
    centroids, mask = predict.predict_case(
        image, model, overlap_z=args.overlap, seg_batch_size=args.seg_batch_size
    )
    seconds = time.perf_counter() - tic
    stage_times = {}
    for message in records.messages:
        stage_times |= {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", message)}
    return {
        **bench.header("predict_memory", "quick" if args.quick else "paper", args.argv),
        "ct": {
            "size": list(image.geometry.size),
            "spacing_mm": list(image.geometry.spacing_mm),
            "dtype": str(image.array.dtype),
            "generation_s": round(make_s, 1),
        },
        "bundle": {
            "preset": preset,
            "grids": {s: getattr(model, s).grid.__dict__ for s in ("spine", "scn", "seg")},
        },
        "overlap_z": args.overlap,
        "seg_batch_size": args.seg_batch_size,
        "num_vertebrae": int(len(centroids.labels)),
        "mask_labels": sorted(int(v) for v in np.unique(mask.array) if v),
        "predict_case_s": round(seconds, 2),
        "stage_s": stage_times,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "rss_after_bundle_gib": round(rss_model, 3),
        "rss_after_reading_ct_gib": round(rss_ct, 3),
        "note": "one call, compile included; peak RSS of the whole process",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CT, tiny networks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlap", type=int, default=None, help="SCN window overlap (slices)")
    parser.add_argument("--seg-batch-size", type=int, default=1)
    parser.add_argument("--work-dir", help="keeps the CT and bundle between runs")
    parser.add_argument("--make-ct", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="result JSON path")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.make_ct:
        spec = QUICK if args.quick else FULL
        make_ct(Path(args.make_ct), spec["size"], spec["spacing_mm"], args.seed)
        return
    result = run(args)
    print(json.dumps(result, indent=2))
    preset = "quick" if args.quick else "paper"
    out = bench.result_path("predict_memory", preset, quick=args.quick, out=args.out)
    print(f"wrote {bench.write_result(out, result, indent=2)}")


if __name__ == "__main__":
    main()
