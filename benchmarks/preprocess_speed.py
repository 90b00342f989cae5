"""Preprocessing of one CT for the three paper stage grids: SimpleITK on the host vs the device.

Host: `infer.inputs.stage_volumes` as `predict_case` runs it (clamp, SmoothingRecursiveGaussian
per distinct sigma, resampling of the whole scan onto the spine 8 mm, SCN 2 mm and segmentation
1 mm grids). Device: `device_preprocessing` (CT transferred once, smoothed once per sigma, the whole
spine and SCN grids and 20 segmentation crops of 128x128x96 at 1 mm sampled on the device). The CT
is synthetic, 512x512x600 at 0.8x0.8x1 mm (int16 HU: a body cylinder of smooth tissue with noise).
After one warm-up (compilation) of each, the two alternate over ``--rounds`` rounds; the result is
the median of the paired ratios host / device, wall and process CPU seconds.

    python benchmarks/preprocess_speed.py            # benchmarks/results/preprocess_speed-...
    python benchmarks/preprocess_speed.py --quick    # small CT, temporary folder
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from benchmarks import common
from verse_jax import device_preprocessing
from verse_jax.geometry import Geometry, Volume, physical_bounding_grid
from verse_jax.infer import inputs
from verse_jax.stages import StageGrid

PAPER_GRIDS = {
    "spine": StageGrid(8.0, (64, 64, 128), 3.0),
    "scn": StageGrid(2.0, (96, 96, 128), 0.75),
    "seg": StageGrid(1.0, (128, 128, 96), 0.75),
}


def synthetic_ct(size, spacing_mm, seed: int = 0) -> Volume:
    """int16 HU CT: a cylinder (body) of smooth soft tissue and bone-like bands, air outside."""
    rng = np.random.default_rng(seed)
    x, y, z = (np.arange(n, dtype=np.float32) * s for n, s in zip(size, spacing_mm, strict=True))
    cx, cy = x[-1] / 2, y[-1] / 2
    radius = 0.45 * min(x[-1], y[-1])
    body = ((x[:, None] - cx) ** 2 + (y[None, :] - cy) ** 2) < radius**2
    plane = 40.0 + 300.0 * np.sin(x[:, None] / 17.0) * np.cos(y[None, :] / 23.0)
    bands = 400.0 * (np.cos(z / 9.0) > 0.6)
    hu = np.where(body[..., None], plane[..., None] + bands[None, None, :], -1000.0)
    hu = hu + rng.normal(0.0, 30.0, size).astype(np.float32)
    return Volume(hu.astype(np.int16), Geometry(tuple(size), tuple(spacing_mm), (0.0, 0.0, 0.0)))


def host_path(image: Volume) -> dict:
    return inputs.stage_volumes(image, PAPER_GRIDS)


def crop_origins(grid: Geometry, crop, count: int) -> np.ndarray:
    """``count`` integer crop origins down the middle column of the grid (vertebrae-like)."""
    size = np.asarray(grid.size)
    z = np.linspace(0, max(size[2] - crop[2], 0), count)
    xy = (size[:2] - np.asarray(crop[:2])) // 2
    return np.array([[xy[0], xy[1], round(v)] for v in z], np.float64)


def device_path(image: Volume, crops: int) -> dict:
    ct = device_preprocessing.put_ct(image)
    out = {}
    for sigma in sorted({g.smoothing_mm for g in PAPER_GRIDS.values()}):
        smoothed = device_preprocessing.smooth(ct, sigma)
        for name, grid in PAPER_GRIDS.items():
            if grid.smoothing_mm != sigma:
                continue
            target = physical_bounding_grid(image.geometry, grid.spacing_mm)
            if name == "seg":
                out[name] = [
                    device_preprocessing.sample_crop(smoothed, target, origin, grid.crop_size)
                    for origin in crop_origins(target, grid.crop_size, crops)
                ]
            else:
                out[name] = device_preprocessing.sample_grid(smoothed, target)
    return jax.block_until_ready(out)


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="96x96x80 CT, 2 rounds, temp folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--crops", type=int, default=20)
    p.add_argument("--out", default="", help="result file (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    size = (96, 96, 80) if args.quick else (512, 512, 600)
    rounds = 2 if args.quick else args.rounds
    image = synthetic_ct(size, (0.8, 0.8, 1.0))
    load_before = os.getloadavg()
    warm = {"device": timed(device_path, image, args.crops), "host": timed(host_path, image)}
    rows = []
    for _ in range(rounds):
        row = {"device": timed(device_path, image, args.crops), "host": timed(host_path, image)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def median(name, k):
        return statistics.median(r[name][k] for r in rows)

    result = {
        **common.header("preprocess_speed", "quick" if args.quick else "paper", argv),
        "ct_size": size,
        "ct_spacing_mm": (0.8, 0.8, 1.0),
        "paper_grids": {k: [g.spacing_mm, g.smoothing_mm] for k, g in PAPER_GRIDS.items()},
        "seg_crops": [args.crops, PAPER_GRIDS["seg"].crop_size],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "warmup_seconds": {k: {"wall": v[0], "cpu": v[1]} for k, v in warm.items()},
        "rounds": [{k: {"wall": v[0], "cpu": v[1]} for k, v in r.items()} for r in rows],
        "median_seconds": {
            name: {"wall": median(name, 0), "cpu": median(name, 1)} for name in ("host", "device")
        },
        "median_paired_ratio_host_over_device": {
            kind: statistics.median(r["host"][k] / r["device"][k] for r in rows)
            for k, kind in enumerate(("wall", "cpu"))
        },
        "note": "host: whole scan on all three grids (seg at 1 mm); device: seg as crops only. "
        "cpu = process CPU seconds (all threads), a load-independent measure of the work.",
    }
    out = common.write_result(
        common.result_path(
            "preprocess_speed", "quick" if args.quick else "paper", quick=args.quick, out=args.out
        ),
        result,
    )
    print(
        json.dumps(result["median_seconds"]),
        json.dumps(result["median_paired_ratio_host_over_device"]),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
