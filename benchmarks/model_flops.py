"""Parameter counts and forward FLOPs per crop of the three networks (no network is run).

FLOPs are XLA's `cost_analysis` of the lowered forward pass with `conv_impl="lax"` (a direct
convolution, so the count is the textbook one; the Winograd path does fewer multiplications and
XLA does not count its batched products the same way).

    python benchmarks/model_flops.py [--preset paper|demo|tiny]

Writes `benchmarks/results/model_flops-<device>-<preset>-<date>.json` (or --out).
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as bench
from verse_jax.models import (
    spine_localization_net,
    vertebrae_localization_net,
    vertebrae_segmentation_net,
)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PAPER_CROPS = {"spine": (64, 64, 128, 1), "scn": (96, 96, 128, 1), "seg": (128, 128, 96, 2)}
FACTORIES = {
    "spine": spine_localization_net,
    "scn": vertebrae_localization_net,
    "seg": vertebrae_segmentation_net,
}


def count(preset: str, stage: str, crop) -> dict:
    net = FACTORIES[stage](preset=preset, conv_impl="lax")
    x = jax.ShapeDtypeStruct((1, *crop), jnp.float32)
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables))
    lowered = jax.jit(lambda v, x: net.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"stage": stage, "crop": list(crop), "parameters": params, "flops": cost["flops"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="paper", choices=["paper", "demo", "tiny"])
    p.add_argument("--out", default=None, help="result JSON path")
    args = p.parse_args(argv)
    rows = [count(args.preset, stage, crop) for stage, crop in PAPER_CROPS.items()]
    for r in rows:
        print(
            f"{r['stage']:<6} crop {'x'.join(map(str, r['crop'])):<14} "
            f"{r['parameters']:>10,} parameters {r['flops'] / 1e12:8.3f} TFLOP forward"
        )
    result = {**bench.header("model_flops", args.preset, argv), "rows": rows}
    out = bench.write_result(bench.result_path("model_flops", args.preset, out=args.out), result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
