"""Random networks for tests and benchmarks: parameters filled on the host and whole bundles.

Nothing in the prediction path imports this module; it exists so that tests and benchmarks can
run the real pipeline on networks with non-trivial outputs without training them.
"""

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from flax import serialization, traverse_util

from verse_jax import stages
from verse_jax.infer.bundle import (
    PAPER_GRIDS,
    STAGES,
    _grid_dict,
    build_model,
    export_stage,
    make_bundle,
)
from verse_jax.models.registry import abstract_params
from verse_jax.stages import StageSpec


def random_params(abstract: Any, seed: int) -> Any:
    """Random params for a shape tree: kernels He normal (std sqrt(2 / fan_in)), biases 0 (numpy).

    Filled on the host so that no initialiser has to be compiled (XLA compiles ``model.init`` of
    even a tiny U-Net for 10+ s on a CPU). Unlike the models' own init, output heads are not scaled
    down, so random networks give non-trivial outputs.
    """
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(serialization.to_state_dict(abstract))
    out = {}
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel" and len(shape) > 1:
            std = np.sqrt(2.0 / max(1, int(np.prod(shape[:-1]))))
            out[path] = (rng.standard_normal(shape) * std).astype(np.float32)
        else:
            out[path] = np.zeros(shape, np.float32)
    return traverse_util.unflatten_dict(out)


def random_bundle(
    out_dir, preset="tiny", seed=0, grids=None, num_landmarks=25, network_kwargs=None, extra=None
) -> Path:
    """Export a bundle of randomly initialised networks (tests, benchmarks); see random_params.

    The spine network's output bias is 1, so that its heatmap is positive and the pipeline finds
    a spine (with a zero bias a random network often has no positive output inside the scan).

    Args:
        out_dir: bundle directory to write.
        preset: network preset of all three factories (``"tiny"``, ``"demo"``, ``"paper"``).
        seed: seed of the random parameters.
        grids: optional ``{stage: grid dict or StageSpec}`` overriding the paper definition.
        num_landmarks: K of the SCN and of the bundle.
        network_kwargs: extra factory kwargs for all three networks, e.g. ``{"conv_impl": "lax"}``.
        extra: metadata for ``bundle.json`` (see :func:`make_bundle`).
    """
    out_dir = Path(out_dir)
    grids = {**PAPER_GRIDS, **(grids or {})}
    stage_dir = out_dir.parent / f".{out_dir.name}.stages-{uuid.uuid4().hex[:8]}"
    try:
        for offset, stage in enumerate(STAGES):
            kwargs = {"preset": preset, **(network_kwargs or {})}
            if stage == "scn":
                kwargs["num_landmarks"] = num_landmarks
            spec = grids[stage]
            if not isinstance(spec, StageSpec):
                grid = _grid_dict(spec, f"random_bundle grid {stage!r}")
                spec = stages.with_grid(stage, grid, num_landmarks)
            model = build_model(spec.factory, kwargs)
            shapes = abstract_params(model, spec.crop_size, spec.input_channels)
            params = random_params(shapes, seed * len(STAGES) + offset)
            if stage == "spine" and "output" in params:  # positive heatmap: a spine is found
                params["output"]["bias"] = np.ones_like(params["output"]["bias"])
            export_stage(
                stage_dir / stage,
                spec=spec,
                factory_kwargs=kwargs,
                params=params,
                sigmas=np.full((num_landmarks,), 4.0, np.float32) if stage == "scn" else None,
                extra={"random": True, "seed": seed},
            )
        return make_bundle(out_dir, **{s: stage_dir / s for s in STAGES}, extra=extra)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
