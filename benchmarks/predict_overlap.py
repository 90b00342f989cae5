"""Cases per hour of `verse-jax predict` over a folder: reading ahead vs one case at a time.

Runs the command in this process on the same inputs, alternating the two modes over the rounds
(overlapped, one at a time, overlapped, ...) after a warm-up pass (compilation), and reports
cases per hour per round and the median of the per-round speed-ups.

    verse-jax phantoms /tmp/ph6 --cases 6 --seed 99 --max-voxels 2000000
    python benchmarks/predict_overlap.py /tmp/ph6 --rounds 3      # shipped demo bundle

Writes `benchmarks/results/predict_overlap-<device>-<shipped|bundle>-<date>.json` (or --out).
"""

import argparse
import contextlib
import io as text_io
import json
import pathlib
import statistics
import tempfile
import time

from benchmarks import common as bench
from verse_jax import cli, io

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def run(inputs, model, flags) -> float:
    """Seconds of one `verse-jax predict` (stdout and the model notice swallowed)."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["predict", "-i", str(inputs), "-o", out, "-q", *flags]
        argv += ["--model", str(model)] if model else []
        tic = time.perf_counter()
        with contextlib.redirect_stdout(text_io.StringIO()):
            code = cli.main(argv)
        seconds = time.perf_counter() - tic
    if code != 0:
        raise SystemExit(f"predict failed (exit {code}) on {inputs}")
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", help="folder or data set of CTs")
    p.add_argument("--model", default=None, help="bundle (default: the shipped demo bundle)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="result JSON path")
    args = p.parse_args(argv)
    cases = io.find_inputs(pathlib.Path(args.inputs))
    run(args.inputs, args.model, ["--no-overlap-io"])  # warm-up: compile for every case's shapes
    modes = {"overlapped": [], "one at a time": ["--no-overlap-io"]}
    seconds = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, flags in modes.items():
            seconds[name].append(run(args.inputs, args.model, flags))
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    per_hour = {name: [len(cases) * 3600 / s for s in times] for name, times in seconds.items()}
    speedup = statistics.median(
        b / a for a, b in zip(seconds["overlapped"], seconds["one at a time"], strict=True)
    )
    preset = "shipped" if args.model is None else "bundle"
    result = {
        **bench.header("predict_overlap", preset, argv),
        "args": vars(args),
        "cases": len(cases),
        "seconds": seconds,
        "cases_per_hour": per_hour,
        "median_cases_per_hour": {k: statistics.median(v) for k, v in per_hour.items()},
        "median_speedup_overlapped": speedup,
    }
    print(
        json.dumps({k: result[k] for k in ("median_cases_per_hour", "median_speedup_overlapped")})
    )
    out = bench.write_result(bench.result_path("predict_overlap", preset, out=args.out), result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
