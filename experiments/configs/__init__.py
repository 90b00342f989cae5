"""Experiment configs: `get_config(arg)` in `spine.py`, `scn.py`, `seg.py` (arg: paper|demo|smoke).

`base_config` holds the fields every stage shares; the stage files fill in their grid, network,
optimizer and loop. Configs are `ml_collections.ConfigDict`s, locked so that a misspelt command-line
override (`--config.optim.lr=...`) is an error instead of a silently new field.
"""

import dataclasses

import ml_collections

from verse_jax import stages

PRESETS = ("paper", "demo", "smoke")
# Narrower augmentation of the demo SCN and segmentation presets (no elastic deformation): the
# small networks learn in minutes with these; the paper presets keep the reference's ranges.
DEMO_AUGMENTATION = {
    "translation_mm": 12.0,
    "rotation_rad": 0.12,
    "scale_iso": 0.08,
    "scale_axes": 0.05,
    "displacement_mm": 0.0,
    "intensity_shift": 0.1,
    "intensity_scale": 0.1,
}


def check_preset(arg: str | None) -> str:
    """The preset named by the config-file argument (default demo); ValueError otherwise."""
    preset = arg or "demo"
    if preset not in PRESETS:
        raise ValueError(f"config argument must be one of {PRESETS}, got {arg!r}")
    return preset


def base_config(stage: str, preset: str) -> ml_collections.ConfigDict:
    """Fields shared by all stages, with paper values where the stages agree."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.preset = preset
    c.seed = 0
    # Call jax.distributed.initialize() first (multi-host; the environment must describe the
    # cluster as JAX expects).
    c.distributed = False

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # VerSe data root; empty: the built-in phantoms (generated once, cached)
    c.data.phantom_cases = 0  # 0: phantoms.default_dataset()'s default number of cases
    c.data.cache_dir = ""  # stage-volume cache; empty: ~/.cache/verse-jax/stages
    c.data.fold = "all"  # 0|1|2 (three-fold cross-validation over the training cases) or all
    # JSON {"0": {"train": [ids], "val": [ids]}, ...}: fixed folds (e.g. the original's) instead
    # of the seeded random split; empty: seeded split.
    c.data.fold_file = ""
    # 25 (VerSe'19); the phantoms, like VerSe'20, have T13 in some cases: 26 (presets below).
    c.data.num_landmarks = 25 if preset == "paper" else 26
    # The stage's grid: the paper definition (verse_jax.stages); presets override it.
    paper = stages.PAPER[stage]
    c.data.spacing_mm = paper.spacing_mm
    c.data.crop_size = paper.crop_size
    c.data.smoothing_mm = paper.smoothing_mm
    c.data.augment = True
    # Half-widths of the uniform augmentation draws (verse_jax.data.augmentation.AugmentRanges); the
    # defaults are the paper definition's (docs/reference.md §3.3-3.4); presets may narrow them.
    ranges = dataclasses.asdict(paper.augment)
    del ranges["control_points"]  # a fixed part of the definition, not a range
    c.data.aug = ml_collections.ConfigDict(ranges)
    c.data.worker_count = 0  # Grain worker processes (0: in the training process)
    # Cases holding rare landmarks enter each epoch up to this many times (0: once, as the
    # reference; verse_jax.data.pipeline.landmark_balance_repeats). Not for "seg".
    c.data.balance_landmarks = 0

    c.model = ml_collections.ConfigDict()
    c.model.preset = "paper"  # network preset of verse_jax.models (paper|demo|tiny)
    c.model.conv_impl = "auto"  # auto (Winograd on CPU) | lax | winograd

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # adam | sgd_nesterov
    c.optim.lr = 1e-4
    c.optim.momentum = 0.99  # sgd_nesterov only
    c.optim.boundaries = (10_000, 15_000)  # TF piecewise_constant: switch when step > boundary
    c.optim.scales = (0.5, 0.1)  # absolute factors of lr after each boundary
    c.optim.clip_norm = 0.0  # clip_by_global_norm; 0: off
    c.optim.weight_decay = 5e-4  # coupled L2 on conv kernels, added to the loss

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 1  # global batch, a multiple of the number of devices
    c.train.num_steps = 20_000
    c.train.log_every = 100
    c.train.eval_every = 5_000
    c.train.checkpoint_every = 5_000
    c.train.max_to_keep = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.max_cases = 0  # 0: every validation case
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
    """The tiny two-step run shared by every stage's `smoke` preset; grids stay per stage."""
    c.data.phantom_cases = 4
    c.model.preset, c.model.conv_impl = "tiny", "lax"
    c.optim.name, c.optim.lr = "adam", 1e-3
    c.optim.boundaries, c.optim.scales = (1,), (0.5,)
    c.train.num_steps, c.train.log_every = 2, 1
    c.train.eval_every, c.train.checkpoint_every = 2, 2
    c.eval.max_cases = 1
