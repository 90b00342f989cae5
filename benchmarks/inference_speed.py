"""Inference throughput, side by side in one run: the headline benchmark of verse-jax.

SCN sliding-window inference on a realistic column (default 96 x 96 x 400 voxels at 2 mm,
128-slice windows with a 96-voxel overlap, i.e. stride 32 and 10 windows), three contenders on the
same weights:

  (a) ours: `verse_jax.infer.sliding_window.sliding_window` (all windows in one jitted function,
      batched);
  (b) the original's way: a Python loop over windows, one jitted network call each, max on the host
      (the weights are an argument of the jitted call, as in (a), not compile-time constants);
  (c) PyTorch + MONAI `sliding_window_inference` on the same architecture and windows (needs the
      optional `bench` extra; weights copied over, outputs compared with our mean merge, as MONAI
      averages overlapping windows).

Compile time is reported apart. Then windows/s, voxels/s, achieved FLOP/s (XLA `cost_analysis`) as a
fraction of this device's matmul peak measured in the same run, and the ratios. Also: segmentation
(all vertebra crops in one batch vs one at a time), whole-column inference vs windows, and one whole
`predict_case`. The contenders alternate over the rounds (a, b, c, a, b, c, ...; at least 3) and
each ratio is the median of the per-round ratios (a/b, a/c in one round).

    python benchmarks/inference_speed.py                 # paper networks (an hour on 2 CPU cores)
    python benchmarks/inference_speed.py --quick         # smoke run (tiny networks)
    python benchmarks/inference_speed.py --dtype bfloat16 --batch-sizes 1,2,5

Writes `benchmarks/results/inference_speed-<device>-<preset>-<dtype>-<date>.json` (`--quick`: a
temporary folder).
"""

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as bench
from verse_jax import phantoms, testing
from verse_jax.geometry import Geometry
from verse_jax.infer import bundle as bundle_lib
from verse_jax.infer import candidates, inputs, predict
from verse_jax.infer import sliding_window as windows
from verse_jax.models import registry, vertebrae_localization_net, vertebrae_segmentation_net

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def whole_column(apply_fn, column, *, multiple: int = 32, pad_value: float = -1.0) -> jnp.ndarray:
    """The fully convolutional network over the whole column at once (no windows).

    The column is padded at its end with `pad_value` to a multiple of `multiple` slices (which must
    be a multiple of the network's size divisor; it also buckets lengths for compilation), run in
    one call, cropped back and clipped at 0 like the max merge of `sliding_window`. It computes
    each voxel once instead of about window_z / stride times, but the network then sees more
    context along z than in training: the landmarks move (up to 27 mm with the demo SCN on
    held-out phantoms; `--scn-export`), so the pipeline does not use it; it lives here, for that
    measurement only.

    Args:
        apply_fn: maps (1, x, y, Z', c) to (1, x, y, Z', k) for any Z' that is a multiple of
            `multiple`.
        column: (x, y, Z, c).
        multiple: slice multiple of the padded length.
        pad_value: value of the padded slices (normalised air -1 by default).

    Returns:
        (x, y, Z, k) float32, >= 0.
    """
    if column.ndim != 4:
        raise ValueError(f"column must be (x, y, z, channels), got shape {column.shape}")
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    size_z = column.shape[2]
    padded = -(-size_z // multiple) * multiple
    x = jnp.pad(
        jnp.asarray(column),
        ((0, 0), (0, 0), (0, padded - size_z), (0, 0)),
        constant_values=pad_value,
    )
    out = apply_fn(x[None])[0, :, :, :size_z]
    return jnp.maximum(out, 0.0).astype(jnp.float32)


def whole_column_landmarks(volume, spine_mm, stage):
    """`predict.predict_landmarks` with the network run once over the whole column (no windows).

    Returns:
        points_mm (K, 3) LPS mm (zeros where invalid), valid (K,) bool.
    """
    spec = stage.spec
    column, geometry = predict.scn_column(volume, spine_mm, spec)
    merged = whole_column(
        stage.apply_fn("heatmaps"),
        jnp.asarray(column),
        multiple=spec.crop_size[2],
        pad_value=spec.window_pad_value,
    )
    _, sequence = predict.landmarks_from_heatmaps(merged, geometry, spec)
    return sequence.points_mm, sequence.valid


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="paper", choices=["paper", "demo", "tiny"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--column-z", type=int, default=400, help="column length in slices")
    p.add_argument("--window-z", type=int, default=128)
    p.add_argument("--overlap", type=int, default=96, help="window overlap in slices")
    p.add_argument("--xy", type=int, default=96, help="column x and y size in voxels")
    p.add_argument("--batch-sizes", default="1,2", help="windows per network call, comma list")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (at least 3)")
    p.add_argument("--seg-vertebrae", type=int, default=4, help="crops in the segmentation test")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch/MONAI contender")
    p.add_argument("--skip", default="", help="comma list of sections: seg,column,predict")
    p.add_argument("--quick", action="store_true", help="tiny networks and sizes")
    p.add_argument(
        "--scn-export",
        default=None,
        help="trained SCN stage export: compare landmarks of windows vs whole column on phantoms",
    )
    p.add_argument("--only-landmarks", action="store_true", help="run only the --scn-export part")
    p.add_argument("--out", default=None, help="result JSON path")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.column_z, args.window_z, args.overlap, args.xy = "tiny", 48, 16, 8, 16
        args.seg_vertebrae, args.batch_sizes = 2, "1,2"
    if args.repeats < 3:
        p.error(f"--repeats {args.repeats}: at least 3 alternating rounds")
    return args


def timed(fn, *args):
    """(seconds, result) of fn(*args) with the result made ready."""
    tic = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - tic, out


def matmul_peak(dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (best of 3), the practical peak of this device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    return 2.0 * n**3 / min(timed(f, a, a)[0] for _ in range(3))


def flops_of(fn, *args) -> float:
    """FLOPs of one call as XLA counts them (`cost_analysis` of the compiled function)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def loop_windows(apply_one, params, column: np.ndarray, window_z: int, overlap_z: int):
    """The original's way: one network call per window, merged by max on the host from zeros.

    ``apply_one(params, window)`` is jitted with the weights as an argument, as ours is."""
    size_z = column.shape[2]
    stride = window_z - overlap_z
    n = windows.num_windows(size_z, window_z=window_z, overlap_z=overlap_z)
    merged = None
    for i in range(n):
        start = min(i * stride, size_z - window_z)
        pred = np.asarray(apply_one(params, column[None, :, :, start : start + window_z]))[0]
        if merged is None:
            merged = np.zeros(pred.shape[:2] + (size_z,) + pred.shape[3:], pred.dtype)
        view = merged[:, :, start : start + window_z]
        np.maximum(view, pred, out=view)
    return merged


def scn_section(args, rows, result):
    dtype = jnp.dtype(args.dtype)
    net = vertebrae_localization_net(preset=args.preset, dtype=dtype)
    window = (args.xy, args.xy, args.window_z)
    params = testing.random_params(
        jax.eval_shape(
            lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *window, 1)), train=False)
        )["params"],
        seed=0,
    )
    params = jax.tree_util.tree_map(jnp.asarray, params)  # on the device once, for every contender
    rng = np.random.default_rng(0)
    column = rng.uniform(-1, 1, (args.xy, args.xy, args.column_z, 1)).astype(np.float32)
    n_win = windows.num_windows(args.column_z, window_z=args.window_z, overlap_z=args.overlap)
    apply_partial = jax.tree_util.Partial(registry.apply_function(net, "heatmaps"), params)
    apply_one = jax.jit(lambda p, x: net.apply({"params": p}, x, train=False).heatmaps)
    # Direct-convolution FLOPs (XLA counts the Winograd path's batched products far too low).
    lax_net = vertebrae_localization_net(preset=args.preset, dtype=dtype, conv_impl="lax")
    win_flops = flops_of(
        lambda x: lax_net.apply({"params": params}, x, train=False).heatmaps,
        jnp.zeros((1, *window, 1)),
    )
    result["scn"] = {"windows": n_win, "flops_per_window": win_flops, "window": window}
    peak = result["peak_flops"]

    def ours(bs, merge="max"):
        return windows.sliding_window(
            apply_partial,
            jnp.asarray(column),
            window_z=args.window_z,
            overlap_z=args.overlap,
            batch_size=bs,
            merge=merge,
        )

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    contenders = {f"ours bs={b}": (lambda b=b: ours(b)) for b in batch_sizes}
    contenders["loop (original)"] = lambda: loop_windows(
        apply_one, params, column, args.window_z, args.overlap
    )
    torch_fn, torch_out = torch_contender(args, net, params, column, n_win)
    if torch_fn is not None:
        contenders["torch+MONAI bs=1"] = torch_fn
    compile_s, times = {}, {name: [] for name in contenders}
    for name, fn in contenders.items():  # first call: compile (JAX) / warm-up (torch)
        compile_s[name] = timed(fn)[0]
    for _ in range(args.repeats):  # rounds: a, b, c, a, b, c, ...
        for name, fn in contenders.items():
            times[name].append(timed(fn)[0])
    result["scn"]["round_seconds"] = times
    for name in contenders:
        best = min(times[name])
        compile_s[name] = max(0.0, compile_s[name] - best)
        rows.append(
            {
                "section": "scn column",
                "contender": name,
                "seconds": best,
                "median_seconds": statistics.median(times[name]),
                "compile_s": compile_s[name],
                "windows_per_s": n_win / best,
                "voxels_per_s": float(np.prod(column.shape[:3])) / best,
                # Direct-convolution FLOPs per second over the measured matmul peak; Winograd
                # does fewer multiplications, so this can exceed 1.
                "flop_fraction_of_peak": n_win * win_flops / best / peak,
            }
        )
    # Speed-ups: per round, the contender's time over ours in that round; then the median.
    for b in batch_sizes:
        ours_t = times[f"ours bs={b}"]
        rows[-len(contenders) + batch_sizes.index(b)]["ratio_vs_loop"] = statistics.median(
            lo / o for lo, o in zip(times["loop (original)"], ours_t, strict=True)
        )
        if torch_fn is not None:
            rows[-len(contenders) + batch_sizes.index(b)]["ratio_vs_torch"] = statistics.median(
                t / o for t, o in zip(times["torch+MONAI bs=1"], ours_t, strict=True)
            )
    ours_max = np.asarray(ours(batch_sizes[0]))
    loop_max = loop_windows(apply_one, params, column, args.window_z, args.overlap)
    result["scn"]["rel_diff_ours_vs_loop"] = float(
        np.abs(ours_max - loop_max).max() / (np.abs(loop_max).max() or 1.0)
    )
    if torch_out is not None:
        ours_mean = np.asarray(ours(batch_sizes[0], merge="mean"))
        scale = float(np.abs(ours_mean).max()) or 1.0
        result["scn"]["rel_diff_ours_mean_vs_torch"] = float(
            np.abs(ours_mean - torch_out).max() / scale
        )
    return net, params, column, apply_one


def torch_contender(args, net, params, column, n_win):
    """(timed fn, output (x, y, z, K) of one run) of PyTorch + MONAI, or (None, None)."""
    if args.no_torch:
        return None, None
    try:
        import torch
        from monai.inferers import sliding_window_inference

        from benchmarks import torch_models
    except ImportError:
        print("torch/monai not installed (pip install -e '.[bench]'): skipping contender (c)")
        return None, None
    torch.set_num_threads(os.cpu_count() or 1)
    twin = torch_models.TorchSCN(
        (args.xy, args.xy, args.window_z),
        num_landmarks=net.num_landmarks,
        filters=net.num_filters_base,
        num_levels=net.num_levels,
        downsample=net.spatial_downsample,
    )
    torch_models.load_flax_params(twin, params)
    x = torch_models.to_torch(column[None])
    overlap = (0.0, 0.0, args.overlap / args.window_z)

    def run():
        with torch.no_grad():
            return sliding_window_inference(
                x, (args.xy, args.xy, args.window_z), 1, twin, overlap=overlap, mode="constant"
            )

    return run, torch_models.from_torch(run())[0]


def seg_section(args, rows):
    dtype = jnp.dtype(args.dtype)
    net = vertebrae_segmentation_net(preset=args.preset, dtype=dtype)
    crop = (16, 16, 16) if args.quick else (128, 128, 96)
    shape = (args.seg_vertebrae, *crop, 2)
    init = lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *crop, 2)), train=False)
    params = testing.random_params(jax.eval_shape(init)["params"], seed=1)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    batched = jax.jit(lambda p, v: jax.nn.sigmoid(net.apply({"params": p}, v, train=False)))
    compile_b = timed(batched, params, x)[0]
    compile_o = timed(batched, params, x[:1])[0]
    t_batch, t_one = [], []
    for _ in range(args.repeats):
        t_batch.append(timed(batched, params, x)[0])
        tic = time.perf_counter()
        for i in range(shape[0]):
            jax.block_until_ready(batched(params, x[i : i + 1]))
        t_one.append(time.perf_counter() - tic)
    ratio = statistics.median(o / b for o, b in zip(t_one, t_batch, strict=True))
    for name, t, c, r in (
        (f"all {shape[0]} crops in one batch", t_batch, compile_b, ratio),
        ("one crop at a time", t_one, compile_o, None),
    ):
        rows.append(
            {
                "section": "segmentation",
                "contender": name,
                "seconds": min(t),
                "compile_s": max(0.0, c - min(t)),
                "crops_per_s": shape[0] / min(t),
                "ratio_vs_one_at_a_time": r,
            }
        )


def column_section(args, rows, result, net, params, column, apply_one):
    """Whole column through the fully convolutional network vs windows: FLOPs, time, heatmaps."""
    divisor = int(np.lcm(2 ** (net.num_levels - 1), net.spatial_downsample))
    size_z = column.shape[2] // divisor * divisor
    col = jnp.asarray(column[None, :, :, :size_z])
    whole = jax.jit(lambda p, x: net.apply({"params": p}, x, train=False).heatmaps)
    lax_net = net.clone(conv_impl="lax")
    flops_whole = flops_of(
        lambda x: lax_net.apply({"params": params}, x, train=False).heatmaps, col
    )
    compile_s = timed(whole, params, col)[0]
    t_whole = min(timed(whole, params, col)[0] for _ in range(args.repeats))
    out_whole = np.maximum(np.asarray(whole(params, col))[0], 0.0)
    out_win = loop_windows(apply_one, params, np.asarray(col[0]), args.window_z, args.overlap)
    n_win = windows.num_windows(size_z, window_z=args.window_z, overlap_z=args.overlap)
    rows.append(
        {
            "section": "whole column",
            "contender": f"whole column z={size_z}",
            "seconds": t_whole,
            "compile_s": max(0.0, compile_s - t_whole),
            "flops": flops_whole,
            "flops_windows": n_win * result["scn"]["flops_per_window"],
        }
    )
    scale = float(np.abs(out_win).max()) or 1.0
    result["whole_column"] = {
        "rel_heatmap_diff_vs_windows": float(np.abs(out_whole - out_win).max() / scale),
        "landmarks": "random weights: see tests/benchmark notes for trained phantom comparison",
    }
    grid = Geometry(tuple(out_win.shape[:3]), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    moved = []
    for heat in (out_win, out_whole):
        cand = candidates.landmark_candidates(heat, grid, min_distance_vox=7.0)
        moved.append(cand)
    both = moved[0].valid[:, 0] & moved[1].valid[:, 0]
    if both.any():
        d = np.linalg.norm(moved[0].points_mm[both, 0] - moved[1].points_mm[both, 0], axis=-1)
        result["whole_column"]["global_max_shift_mm_max"] = float(d.max())


def predict_section(args, rows):
    image = phantoms.generate_phantom(3, fov="lumbar", spacing_mm=(1.0, 1.0, 2.0)).image
    with tempfile.TemporaryDirectory() as tmp:
        grids = None
        if args.quick:
            grids = {
                "spine": {"spacing_mm": 8.0, "crop_size": [32, 32, 64], "smoothing_mm": 3.0},
                "scn": {"spacing_mm": 4.0, "crop_size": [32, 32, 32], "smoothing_mm": 0.75},
                "seg": {"spacing_mm": 2.0, "crop_size": [32, 32, 32], "smoothing_mm": 0.75},
            }
        path = testing.random_bundle(
            pathlib.Path(tmp) / "b", preset=args.preset, grids=grids, network_kwargs=None
        )
        bundle = bundle_lib.load_bundle(path)
        times = []
        for _ in range(1 if args.quick else 2):
            try:
                times.append(timed(lambda: predict.predict_case(image, bundle)[1].array)[0])
            except predict.NoSpineFoundError as err:  # random weights may find nothing
                print(f"predict_case: {err}")
                return
    rows.append(
        {
            "section": "predict_case",
            "contender": f"phantom {image.geometry.size} ({args.preset} random weights)",
            "seconds": min(times),
            "first_call_s": times[0],
        }
    )


def landmark_section(args, result):
    """Landmarks of windows vs whole column with a trained SCN export, on held-out phantoms."""
    from verse_jax import io

    stage = bundle_lib.load_stage(args.scn_export)
    root = phantoms.default_dataset()
    split = io.read_splits(root)
    cases = {c.case_id: c for c in io.find_cases(root)}
    shifts, times = [], {"windows": 0.0, "whole": 0.0}
    for case_id in split["val"] + split["test"]:
        case = cases[case_id]
        image = io.read_volume(case.image_path)
        gt = io.read_centroids(case.centroids_path, image.geometry)
        volume = inputs.stage_volumes(image, {"scn": stage.grid})["scn"]
        spine_mm = gt.points_mm.mean(axis=0)
        out = {}
        for name in ("windows", "whole"):
            tic = time.perf_counter()
            if name == "whole":
                out[name] = whole_column_landmarks(volume, spine_mm, stage)
            else:
                out[name] = predict.predict_landmarks(volume, spine_mm, stage)
            times[name] += time.perf_counter() - tic
        both = out["windows"][1] & out["whole"][1]
        d = np.linalg.norm(out["windows"][0][both] - out["whole"][0][both], axis=-1)
        differ = int(np.sum(out["windows"][1] != out["whole"][1]))
        shifts.append(
            {"case": case_id, "max_shift_mm": float(d.max(initial=0.0)), "differ": differ}
        )
    worst = max(s["max_shift_mm"] for s in shifts)
    result["whole_column_landmarks"] = {
        "export": str(args.scn_export),
        "cases": shifts,
        "max_shift_mm": worst,
        "cases_with_different_labels": sum(s["differ"] > 0 for s in shifts),
        "seconds_incl_compile": times,
        "within_1mm": worst <= 1.0 and all(s["differ"] == 0 for s in shifts),
    }


def print_table(rows):
    keys = ["seconds", "compile_s", "windows_per_s", "flop_fraction_of_peak"]
    keys += ["ratio_vs_loop", "ratio_vs_torch", "ratio_vs_one_at_a_time"]
    print(f"{'section':<14} {'contender':<34} " + " ".join(f"{k:>14}" for k in keys))
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k)
            cells.append(f"{v:>14.3g}" if isinstance(v, float | int) else f"{'':>14}")
        print(f"{row['section']:<14} {row['contender']:<34} " + " ".join(cells))


def main(argv=None):
    args = parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    preset = "quick" if args.quick else f"{args.preset}-{args.dtype}"
    result = {
        **bench.header("inference_speed", preset, argv),
        "args": vars(args),
        "peak_flops": matmul_peak(dtype, 512 if args.quick else 2048),
    }
    rows = []
    skip = set(filter(None, args.skip.split(",")))
    if args.scn_export:
        landmark_section(args, result)
        print(json.dumps(result["whole_column_landmarks"], indent=1))
    if args.only_landmarks:
        skip |= {"scn", "column", "seg", "predict"}
    if "scn" not in skip:
        net, params, column, apply_one = scn_section(args, rows, result)
    if not skip & {"column", "scn"}:
        column_section(args, rows, result, net, params, column, apply_one)
    if "seg" not in skip:
        seg_section(args, rows)
    if "predict" not in skip:
        predict_section(args, rows)
    result["rows"] = rows
    print(f"device {result['device']}, matmul peak {result['peak_flops'] / 1e9:.0f} GFLOP/s")
    print_table(rows)
    print(json.dumps({k: v for k, v in result.items() if k in ("scn", "whole_column")}, indent=1))
    out = bench.result_path("inference_speed", preset, quick=args.quick, out=args.out)
    print(f"wrote {bench.write_result(out, result)}")
    return result


if __name__ == "__main__":
    main()
