"""Training speed per stage: the whole jitted train step, compile time, the data pipeline's share.

For each stage (spine, scn, seg) and preset (`experiments/configs/<stage>.py`: paper, demo; --quick:
smoke), the benchmark builds exactly what `experiments/common.run` trains, with the same two
calls: the training script's `make_stage(config)` (network, loss, sigmas) and
`experiments.trainer.create_trainer` (Grain pipeline, network, optimizer, initial state and the
train step with the on-device augmentation), jitted with `donate_argnums=0`. Data: a few phantoms
(`phantoms.write_phantom_dataset`) in a temporary folder, all cases used for training.

Figures per (stage, preset):
  * compile_s: lowering + XLA compilation of the step (ahead of time), apart from the steps;
  * step_s: wall time of one step (device augmentation + forward + backward + optimizer update),
    median of --repeats steps after one warm-up step, each on a fresh batch already on the device;
    steps/s = 1 / step_s, samples/s = batch size / step_s;
  * host: seconds per raw batch of the Grain iterator drawn back to back (context boxes + random
    numbers, in the training process as the configs run it; Grain's prefetch buffer drained
    first) -> host samples/s; data_share = host batch time / step time (the share of a step the
    host would need if nothing overlapped; `fit` draws the next batch while the step runs).
    Also recorded: how long the step loop waited for each batch, and the device put time;
  * augment: the jitted device transform alone on one raw batch (median of its repeats) and its
    fraction of the step.

    python benchmarks/train_speed.py                         # demo + paper, all stages (long)
    python benchmarks/train_speed.py --presets demo --stages scn seg
    python benchmarks/train_speed.py --quick       # smoke configs, tiny nets, lax conv, XLA -O0

Prints a table and writes benchmarks/results/train_speed-<device>-<preset>-<date>.json (atomic;
preset `demo+paper`, `demo`, ... or `quick`, which goes to a temporary folder). Runs unchanged on
a GPU (device from `jax.default_backend()`).
"""

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common as bench
from experiments import common, train_scn, train_seg, train_spine, trainer
from experiments.configs import scn, seg, spine
from verse_jax import phantoms
from verse_jax.data import samples
from verse_jax.io import datasets
from verse_jax.train import sharding

STAGES = ("spine", "scn", "seg")
SCRIPTS = {"spine": (train_spine, spine), "scn": (train_scn, scn), "seg": (train_seg, seg)}
REPEATS = {"paper": 2, "demo": 10, "smoke": 3}  # timed steps after the warm-up step
PREFETCH_DRAIN = 3  # batches Grain may hold ready (data_pipeline._finish: prefetch_buffer_size=2)
log = logging.getLogger("train_speed")


def stage_config(stage: str, preset: str, root: Path, cache_dir: Path, conv_impl: str | None):
    """The training config of (stage, preset) on the phantoms in `root`."""
    config = SCRIPTS[stage][1].get_config(preset)
    config.data.root = str(root)
    config.data.cache_dir = str(cache_dir)
    if conv_impl is not None:
        config.model.conv_impl = conv_impl
    return config


def data_mesh(batch_size: int) -> jax.sharding.Mesh:
    """Mesh over as many local devices as divide the batch (all of them if the batch allows)."""
    devices = jax.local_devices()
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return sharding.make_mesh(devices[:count])


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def _median(values) -> float:
    return float(statistics.median(values))


def _num_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        value = float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is optional and backend-dependent
        return None
    return value if math.isfinite(value) and value > 0 else None


def _temp_gib(compiled) -> float | None:
    try:
        return round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)
    except Exception:  # not every backend reports it
        return None


def build(stage: str, preset: str, root: Path, cache_dir: Path, conv_impl: str | None) -> dict:
    """Everything one (stage, preset) measurement needs: the training script's `make_stage` and
    `experiments.trainer.create_trainer`, as `experiments/common.run` trains it."""
    config = stage_config(stage, preset, root, cache_dir, conv_impl)
    parts = SCRIPTS[stage][0].make_stage(config)
    mesh = data_mesh(config.train.batch_size)
    start = time.perf_counter()
    built = trainer.create_trainer(
        config, parts, mesh=mesh, train_ids=datasets.select_case_ids(root)
    )
    setup_s = time.perf_counter() - start
    state = sharding.replicate(built.init_state(), mesh)
    return {
        "config": config,
        "spec": built.spec,
        "mesh": mesh,
        "dataset": built.dataset,
        "cache_s": setup_s,
        "step": built.step,
        "state": state,
        "num_params": _num_params(state.params),
        "factory_kwargs": dict(parts.factory_kwargs),
    }


def draw(iterator, mesh) -> tuple[float, float, dict]:
    """(host draw s, device put s, sharded raw batch) of the next batch."""
    start = time.perf_counter()
    raw = next(iterator)
    host_s = time.perf_counter() - start
    put_s, batch = _timed(sharding.shard_batch, raw, mesh)
    return host_s, put_s, batch


def time_steps(b: dict, iterator, repeats: int, options: dict | None) -> dict:
    """Compiles the step ahead of time, runs one warm-up step, then `repeats` timed steps, each
    on a fresh batch (drawn and put on the device before the step's clock starts)."""
    mesh, rng = b["mesh"], jax.random.key(b["config"].seed)
    first_s, _, batch = draw(iterator, mesh)
    start = time.perf_counter()
    lowered = jax.jit(b["step"], donate_argnums=0).lower(b["state"], batch, rng)
    compiled = lowered.compile(compiler_options=options)
    compile_s = time.perf_counter() - start
    warmup_s, (state, metrics) = _timed(compiled, b["state"], batch, rng)
    log.info("compile %.1f s, warm-up step %.2f s", compile_s, warmup_s)
    out = {"first_s": first_s, "compile_s": compile_s, "warmup_s": warmup_s, "wait": [], "put": []}
    out |= {"steps": [], "losses": [float(metrics["loss"])], "compiled": compiled}
    for _ in range(repeats):
        wait_s, put_s, batch = draw(iterator, mesh)
        step_s, (state, metrics) = _timed(compiled, state, batch, rng)
        log.info("step %.3f s (waited %.4f s for the batch)", step_s, wait_s)
        out["wait"].append(wait_s)
        out["put"].append(put_s)
        out["steps"].append(step_s)
        out["losses"].append(float(metrics["loss"]))
    return out


def host_batch_seconds(iterator, batches: int) -> tuple[float, dict]:
    """(seconds per raw batch, last raw batch) of back-to-back draws after draining Grain's
    prefetch buffer (so the figure is the pipeline's production rate, not a buffered hand-out)."""
    for _ in range(PREFETCH_DRAIN):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        raw = next(iterator)
    return (time.perf_counter() - start) / batches, raw


def augment_seconds(spec, batch, repeats: int, options: dict | None) -> list[float]:
    """Times of the jitted device transform alone on one (device) raw batch, after a warm-up."""
    lowered = jax.jit(samples.make_device_transform(spec)).lower(batch)
    compiled = lowered.compile(compiler_options=options)
    _timed(compiled, batch)
    return [_timed(compiled, batch)[0] for _ in range(repeats)]


def measure(stage: str, preset: str, root: Path, cache_dir: Path, args) -> dict:
    """One row of the benchmark (see the module docstring for the figures)."""
    b = build(stage, preset, root, cache_dir, args.conv_impl)
    config, spec = b["config"], b["spec"]
    iterator = iter(b["dataset"])
    t = time_steps(b, iterator, args.repeats or REPEATS[preset], args.compiler_options)
    host_s, raw = host_batch_seconds(iterator, args.host)
    batch = sharding.shard_batch(raw, b["mesh"])
    augment = augment_seconds(spec, batch, max(len(t["steps"]), 3), args.compiler_options)
    if hasattr(iterator, "close"):
        iterator.close()
    batch_size = config.train.batch_size
    step_s, aug_s = _median(t["steps"]), _median(augment)
    flops = _flops(t["compiled"])
    return {
        "stage": stage,
        "preset": preset,
        "network": b["factory_kwargs"],
        "num_params": b["num_params"],
        "spacing_mm": spec.spacing_mm,
        "crop_size": list(spec.crop_size),
        "batch_size": batch_size,
        "devices": b["mesh"].size,
        "compile_s": t["compile_s"],
        "warmup_step_s": t["warmup_s"],
        "step_s": t["steps"],
        "step_s_median": step_s,
        "steps_per_s": 1.0 / step_s,
        "samples_per_s": batch_size / step_s,
        "xla_cost_analysis_gflop": None if flops is None else flops / 1e9,
        "step_temp_gib": _temp_gib(t["compiled"]),
        "losses": t["losses"],
        "host": {
            "cache_prepare_s": b["cache_s"],
            "first_batch_s": t["first_s"],
            "batch_s": host_s,
            "samples_per_s": batch_size / host_s,
            "wait_in_step_loop_s": t["wait"],
            "device_put_s_median": _median(t["put"]),
            "box_size": list(raw["image"].shape[1:4]),
        },
        "augment": {"step_s": augment, "step_s_median": aug_s, "fraction_of_step": aug_s / step_s},
        "data_share": host_s / step_s,
    }


TABLE = (
    ("stage", "{stage:<6}"),
    ("preset", "{preset:<6}"),
    ("crop", "{crop:>11}"),
    ("B", "{batch_size:>2}"),
    ("params", "{num_params:>9,}"),
    ("compile s", "{compile_s:>9.1f}"),
    ("step s", "{step_s_median:>8.3f}"),
    ("steps/s", "{steps_per_s:>8.3g}"),
    ("samples/s", "{samples_per_s:>9.3g}"),
    ("host samples/s", "{host_rate:>14.3g}"),
    ("data share", "{data_share:>10.2%}"),
    ("aug share", "{aug_share:>9.2%}"),
)


def format_table(rows: list[dict]) -> str:
    widths = [len(fmt.format(**_table_values(rows[0]))) if rows else len(h) for h, fmt in TABLE]
    head = " ".join(h.rjust(max(w, len(h))) for (h, _), w in zip(TABLE, widths, strict=True))
    lines = [head]
    for row in rows:
        values = _table_values(row)
        cells = [fmt.format(**values) for _, fmt in TABLE]
        lines.append(
            " ".join(
                c.rjust(max(w, len(h))) for c, (h, _), w in zip(cells, TABLE, widths, strict=True)
            )
        )
    return "\n".join(lines)


def _table_values(row: dict) -> dict:
    return {
        **row,
        "crop": "x".join(map(str, row["crop_size"])),
        "host_rate": row["host"]["samples_per_s"],
        "aug_share": row["augment"]["fraction_of_step"],
    }


def _preset(args) -> str:
    return "quick" if args.quick else "+".join(args.presets)


def header(args, phantom_s: float) -> dict:
    return {
        **bench.header("train_speed", _preset(args), args.argv),
        # the name of the measurement; --quick runs are smoke tests of the benchmark
        "benchmark": "train_speed" + ("-quick" if args.quick else ""),
        "platform": jax.default_backend(),
        "data": {"phantom_cases": args.cases, "seed": args.seed, "generation_s": phantom_s},
        "compiler_options": args.compiler_options,
        "repeats": args.repeats
        or {p: REPEATS[p] for p in (["smoke"] if args.quick else args.presets)},
        "notes": (
            "step_s: whole jitted train step (device augmentation + forward + backward + "
            "optimizer), batch already on the device; compile_s apart. host.batch_s: Grain "
            "iterator in the training process, batches drawn back to back after draining its "
            "prefetch buffer; data_share = host.batch_s / step_s (device put not included, see "
            "host.device_put_s_median); augment: the device transform alone, fraction of "
            "step_s. xla_cost_analysis_gflop: XLA's count for the compiled step, not a "
            "direct-convolution count (Winograd multiplies far less; loop bodies may be "
            "counted once). Timings on this shared CPU swing by 25-50 %; machine.loadavg is "
            "taken after each row."
        ),
        "complete": False,
        "results": [],
    }


def run(args, out: Path | None) -> dict:
    """Measures every (preset, stage); rewrites `out` after each row (partial results survive)."""
    presets = ["smoke"] if args.quick else args.presets
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        root = Path(tmp) / "phantoms"
        start = time.perf_counter()
        kwargs = {"max_voxels": args.max_voxels} if args.max_voxels else {}
        phantoms.write_phantom_dataset(root, args.cases, seed=args.seed, **kwargs)
        result = header(args, time.perf_counter() - start)
        out = bench.result_path("train_speed", _preset(args), quick=args.quick, out=out)
        for preset in presets:
            for stage in args.stages:
                log.info("measuring %s / %s", stage, preset)
                try:
                    row = measure(stage, preset, root, Path(tmp) / "cache", args)
                except Exception as err:  # keep the other rows; the error is in the JSON
                    if args.quick:
                        raise
                    log.exception("%s / %s failed", stage, preset)
                    row = {"stage": stage, "preset": preset, "error": repr(err)}
                result["results"].append(row)
                result["machine"] = bench.header("train_speed", _preset(args))["machine"]
                bench.write_result(out, result, indent=2)
    result["complete"] = True
    bench.write_result(out, result, indent=2)
    result["out"] = str(out)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument(
        "--presets", nargs="+", choices=("paper", "demo"), default=["demo", "paper"]
    )
    parser.add_argument("--quick", action="store_true", help="smoke configs (tiny nets), < ~60 s")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps (default: paper 2, demo 10, quick 3)"
    )
    parser.add_argument("--host", type=int, default=None, help="host batches timed (default 20)")
    parser.add_argument("--cases", type=int, default=None, help="phantoms (default 3; 1 quick)")
    parser.add_argument("--max-voxels", type=int, default=None, help="phantom voxel budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--conv-impl",
        choices=("auto", "lax", "winograd"),
        help="override config.model.conv_impl (default: the config's, auto; quick: lax, whose "
        "compile is about half as long on the CPU)",
    )
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.host is None:
        args.host = 20
    if args.cases is None:
        args.cases = 1 if args.quick else 3
    if args.quick and args.max_voxels is None:
        args.max_voxels = 2_000_000
    if args.quick and args.conv_impl is None:
        args.conv_impl = "lax"
    # --quick: XLA's cheapest backend optimisation level (shorter compiles; slower steps).
    args.compiler_options = {"xla_backend_optimization_level": 0} if args.quick else None
    if (args.repeats is not None and args.repeats < 1) or args.cases < 1:
        parser.error("--repeats and --cases must be >= 1")
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    common.setup_logging()
    result = run(args, args.out)
    print(format_table([r for r in result["results"] if "error" not in r]))
    for row in result["results"]:
        if "error" in row:
            print(f"{row['stage']} / {row['preset']} failed: {row['error']}")
    print(f"wrote {result['out']}")
    return result


if __name__ == "__main__":
    main()
