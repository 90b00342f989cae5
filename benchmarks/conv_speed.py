"""3x3x3 convolution speed on the CPU: lax.conv vs Winograd F(2,3)/F(4,3) vs PyTorch Conv3d.

Cases: one 64 -> 64 layer (48x48x64 and 96x96x128) and the paper SCN on one 96x96x128 crop
(batch 1), each forward and forward+backward (gradients of input and kernel for the layer; of all
parameters for the SCN, loss 0.5 * sum(heatmaps^2), no dropout). Contenders run alternately, one
call each per round; ratios are medians of per-round ratios (timings on a shared 2-core machine
swing by 25-50 %, ratios taken in the same round much less). GFLOP/s are direct-convolution FLOPs
(layer: 2 * 27 * cin * cout per voxel; SCN: XLA's cost analysis of the lax forward, x3 for
forward+backward) per second. Compile time (JAX's first call) is reported apart.

PyTorch (``pip install torch==2.13.0``, the CPU build) is optional: without it the
torch contenders are left out. The SCN twin and weight copy come from ``benchmarks/torch_models.py``
(same weights; the output difference is reported).

    python benchmarks/conv_speed.py --scn-repeats 2   # full, ~40 min on 2 busy cores
    python benchmarks/conv_speed.py --quick      # tiny sizes, 1 round, SCN fwd only
    python benchmarks/conv_speed.py --cases layer48 --repeats 5

Writes ``benchmarks/results/conv_speed-<device>-<full|tag>-<date>.json`` (``--quick``: a temporary
folder; ``--out``: that file).
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common as bench
from verse_jax.models import vertebrae_localization_net
from verse_jax.models.winograd import winograd_conv3d

try:
    import torch

    from benchmarks import torch_models
except ImportError:  # torch is an optional baseline
    torch = None


def _block(tree):
    return jax.block_until_ready(tree)


def _lax_conv(x, kernel):
    dims = ("NDHWC", "DHWIO", "NDHWC")
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=dims)


def _jax_layer(conv, x, kernel, ct, backward):
    """Jitted forward, or forward + VJP (input and kernel gradients for cotangent ct)."""
    if not backward:
        fn = jax.jit(conv)
        return lambda: _block(fn(x, kernel))

    def fwd_bwd(x, kernel, ct):
        _, vjp = jax.vjp(conv, x, kernel)
        return vjp(ct)

    fn = jax.jit(fwd_bwd)
    return lambda: _block(fn(x, kernel, ct))


def _torch_layer(x, kernel, ct, backward, channels_last):
    cin, cout = kernel.shape[3:]
    conv = torch.nn.Conv3d(cin, cout, 3, padding=1, bias=False)
    weight = np.ascontiguousarray(np.asarray(kernel).transpose(4, 3, 0, 1, 2))
    conv.weight.data = torch.from_numpy(weight)
    tx, tct = torch_models.to_torch(x), torch_models.to_torch(ct)
    if channels_last:
        fmt = torch.channels_last_3d
        conv = conv.to(memory_format=fmt)
        tx, tct = tx.to(memory_format=fmt), tct.to(memory_format=fmt)
    if not backward:

        def run():
            with torch.no_grad():
                return conv(tx)

        return run

    def run_backward():
        conv.weight.grad = None
        xg = tx.detach().requires_grad_(True)
        conv(xg).backward(tct)
        return xg.grad, conv.weight.grad

    return run_backward


def layer_case(size, cin, cout, backward, torch_ok):
    """Contenders for one 3x3x3 layer; returns (contenders, flops, check)."""
    kx, kk, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (1, *size, cin), jnp.float32)
    kernel = jax.random.normal(kk, (3, 3, 3, cin, cout), jnp.float32) / np.sqrt(27 * cin)
    ct = jax.random.normal(kc, (1, *size, cout), jnp.float32)
    contenders = {
        "lax": _jax_layer(_lax_conv, x, kernel, ct, backward),
        "wino_f2": _jax_layer(lambda a, b: winograd_conv3d(a, b, tile=2), x, kernel, ct, backward),
        "wino_f4": _jax_layer(lambda a, b: winograd_conv3d(a, b, tile=4), x, kernel, ct, backward),
    }
    check = {}
    if torch_ok:
        contenders["torch"] = _torch_layer(x, kernel, ct, backward, channels_last=False)
        contenders["torch_cl3d"] = _torch_layer(x, kernel, ct, backward, channels_last=True)
        if not backward:
            reference = np.asarray(_lax_conv(x, kernel))
            got = torch_models.from_torch(contenders["torch"]())
            check["torch_vs_lax_max_abs_diff"] = float(np.max(np.abs(got - reference)))
    flops = 2 * 27 * cin * cout * int(np.prod(size)) * (3 if backward else 1)
    return contenders, flops, check


def _scn_loss(model, params, x):
    heatmaps = model.apply({"params": params}, x, train=False).heatmaps
    return 0.5 * jnp.sum(heatmaps**2)


def _jax_scn(preset, conv_impl, params, x, backward):
    model = vertebrae_localization_net(preset=preset, conv_impl=conv_impl)
    if backward:
        fn = jax.jit(jax.grad(lambda p, x: _scn_loss(model, p, x)))
    else:
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False).heatmaps)
    return lambda: _block(fn(params, x))


def _torch_scn(preset, params, x, backward, channels_last):
    model = vertebrae_localization_net(preset=preset)
    twin = torch_models.TorchSCN(
        x.shape[1:4],
        num_landmarks=model.num_landmarks,
        filters=model.num_filters_base,
        num_levels=model.num_levels,
        downsample=model.spatial_downsample,
    )
    twin = torch_models.load_flax_params(twin, jax.tree_util.tree_map(np.asarray, params))
    tx = torch_models.to_torch(x)
    if channels_last:
        twin = twin.to(memory_format=torch.channels_last_3d)
        tx = tx.to(memory_format=torch.channels_last_3d)
    if not backward:

        def run():
            with torch.no_grad():
                return twin(tx)

        return run

    def run_backward():
        twin.zero_grad(set_to_none=True)
        (0.5 * torch.sum(twin(tx) ** 2)).backward()
        return [p.grad for p in twin.parameters()]

    return run_backward


def scn_case(preset, size, backward, torch_ok):
    """Contenders for the SCN on one crop; returns (contenders, flops, check)."""
    model = vertebrae_localization_net(preset=preset, conv_impl="lax")
    x = jax.random.uniform(jax.random.key(1), (1, *size, 1), jnp.float32, -1.0, 1.0)
    params = jax.jit(lambda k: model.init(k, x, train=False)["params"])(jax.random.key(2))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False).heatmaps)
    cost = forward.lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost["flops"]) * (3 if backward else 1)
    contenders = {
        "lax": _jax_scn(preset, "lax", params, x, backward),
        "wino_f4": _jax_scn(preset, "winograd", params, x, backward),
    }
    check = {}
    if torch_ok:
        contenders["torch"] = _torch_scn(preset, params, x, backward, channels_last=False)
        contenders["torch_cl3d"] = _torch_scn(preset, params, x, backward, channels_last=True)
        if not backward:
            reference = np.asarray(forward(params, x))
            got = torch_models.from_torch(contenders["torch"]())
            check["torch_vs_lax_max_abs_diff"] = float(np.max(np.abs(got - reference)))
            check["heatmap_max_abs"] = float(np.max(np.abs(reference)))
    return contenders, flops, check


def measure(contenders, repeats):
    """First call (compile) apart, then ``repeats`` rounds alternating the contenders."""
    first, times = {}, {name: [] for name in contenders}
    for name, run in contenders.items():
        start = time.perf_counter()
        run()
        first[name] = time.perf_counter() - start
    names = list(contenders)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return first, times


def paired_ratio(times, a, b):
    """Median over rounds of time(a) / time(b)."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True))


def summarise(case, mode, first, times, flops, check):
    """One result row per contender."""
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        row = dict(case=case, mode=mode, contender=name, median_s=median, min_s=min(ts))
        row.update(first_call_s=first[name], gflops=flops / median / 1e9, times_s=ts)
        if "lax" in times:
            row["ratio_vs_lax"] = paired_ratio(times, name, "lax")
        if "torch" in times:
            row["ratio_vs_torch"] = paired_ratio(times, name, "torch")
        rows.append(row)
    if check:
        rows[0]["check"] = check
    return rows


def print_rows(rows):
    header = f"{'case':12s} {'mode':8s} {'contender':11s} {'median s':>9s} {'min s':>8s}"
    header += f" {'GFLOP/s':>8s} {'1st call':>9s} {'/lax':>6s} {'/torch':>7s}"
    print(header)
    for r in rows:
        vs_torch = f"{r['ratio_vs_torch']:7.2f}" if "ratio_vs_torch" in r else f"{'-':>7s}"
        vs_lax = f"{r['ratio_vs_lax']:6.2f}" if "ratio_vs_lax" in r else f"{'-':>6s}"
        print(
            f"{r['case']:12s} {r['mode']:8s} {r['contender']:11s} {r['median_s']:9.3f} "
            f"{r['min_s']:8.3f} {r['gflops']:8.1f} {r['first_call_s']:9.2f} "
            f"{vs_lax} {vs_torch}",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--scn-repeats", type=int, default=None, help="rounds for SCN cases")
    parser.add_argument("--cases", default=None, help="comma list of case names (default all)")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    parser.add_argument("--skip", default="", help="comma list of contenders to leave out")
    parser.add_argument("--tag", default="", help="preset in the result file name (default full)")
    parser.add_argument("--out", default=None, help="result JSON path")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    torch_ok = torch is not None
    if args.quick:
        cases = {
            "layer12": lambda b: layer_case((12, 12, 16), 8, 8, b, torch_ok),
            "scn_tiny16": lambda b: scn_case("tiny", (16, 16, 16), b, torch_ok),
        }
    else:
        cases = {
            "layer48": lambda b: layer_case((48, 48, 64), 64, 64, b, torch_ok),
            "layer96": lambda b: layer_case((96, 96, 128), 64, 64, b, torch_ok),
            "scn96": lambda b: scn_case("paper", (96, 96, 128), b, torch_ok),
        }
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - set(cases))
        if unknown:
            parser.error(f"unknown cases {unknown}; choose from {sorted(cases)}")
        cases = {name: cases[name] for name in wanted}
    rows, load_start = [], os.getloadavg()
    preset = "quick" if args.quick else (args.tag or "full")
    out = bench.result_path("conv_speed", preset, quick=args.quick, out=args.out)
    meta = dict(
        bench.header("conv_speed", preset, argv),
        torch=torch.__version__ if torch_ok else None,
        repeats=repeats,
        scn_repeats=args.scn_repeats or repeats,
    )
    for case, build in cases.items():
        for mode in args.modes.split(","):
            if args.quick and case.startswith("scn") and mode != "fwd":
                continue  # the Winograd SCN's backward compiles for ~20 s
            contenders, flops, check = build(mode == "fwd+bwd")
            for skipped in args.skip.split(",") + (["torch_cl3d"] if args.quick else []):
                contenders.pop(skipped, None)
            rounds = args.scn_repeats if case.startswith("scn") and args.scn_repeats else repeats
            first, times = measure(contenders, rounds)
            new = summarise(case, mode, first, times, flops, check)
            print_rows(new)
            rows.extend(new)
            del contenders
            # Written after every case, so that an interrupted run keeps what it measured.
            loads = [load_start, os.getloadavg()]
            bench.write_result(out, dict(meta, load_average_start_now=loads, rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
