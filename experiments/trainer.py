"""Config -> what one training run needs: data, network, optimizer, state and the train step.

`create_trainer(config, stage)` builds exactly what `experiments.common.run` trains (and what
`benchmarks/train_speed.py` measures): the stage definition of the config, the Grain pipeline over
the training cases, the network of the stage, the optimizer and its schedule, the initial
(replicated) train state and the pure train step with the on-device augmentation.
"""

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.selection import Selection
from verse_jax import phantoms, stages
from verse_jax.data import pipeline as data_pipeline
from verse_jax.data import samples
from verse_jax.data.augmentation import AugmentRanges
from verse_jax.infer import bundle
from verse_jax.io import datasets
from verse_jax.stages import StageSpec
from verse_jax.train import sharding
from verse_jax.train import state as train_state

log = logging.getLogger("experiments")


@dataclasses.dataclass(frozen=True)
class Stage:
    """What differs between the stages.

    Attributes:
        factory: network factory name (`verse_jax.stages.FACTORIES`).
        factory_kwargs: its keyword arguments, from the config.
        make_loss: `(model.apply, landmarks) -> loss_fn` (`verse_jax.train.stage_losses`);
            `landmarks` is None, or the (num_cases, K) landmarks held by the training cases
            when the stage asks for them (`uses_training_landmarks`).
        make_evaluate: `common.Context -> (TrainState -> {metric: float})` on the validation cases.
        sigmas: (K,) initial learnable sigmas (SCN) or None.
        select: `(metric, "max"|"min")`: the validation value that picks the exported step.
        tie_break: a second `(metric, mode)` for equal values of the first.
        uses_training_landmarks: `make_loss` gets the training cases' landmarks.
    """

    factory: str
    factory_kwargs: dict
    make_loss: Callable[[Callable, np.ndarray | None], train_state.LossFn]
    make_evaluate: Callable[[Any], Callable[[train_state.TrainState], dict]]
    sigmas: np.ndarray | None = None
    select: tuple[str, str] | None = None
    tie_break: tuple[str, str] | None = None
    uses_training_landmarks: bool = False

    def selection(self) -> Selection | None:
        return None if self.select is None else Selection(*self.select, self.tie_break)


def build_optimizer(optim: ml_collections.ConfigDict):
    """`(optax transformation, learning-rate schedule)` from `config.optim`."""
    schedule = train_state.piecewise_constant_tf(
        optim.lr, tuple(optim.boundaries), tuple(optim.scales)
    )
    makers = {
        "adam": lambda: optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8),
        "sgd_nesterov": lambda: optax.sgd(schedule, momentum=optim.momentum, nesterov=True),
    }
    if optim.name not in makers:
        raise ValueError(f"config.optim.name must be one of {sorted(makers)}, got {optim.name!r}")
    optimizer = makers[optim.name]()
    if optim.clip_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(optim.clip_norm), optimizer)
    return optimizer, schedule


# Stage definition fields a config may set in `config.data` (besides the grid, K and augment).
_SPEC_FIELDS = (
    "posterior_offset_mm",
    "heatmap_sigma_vox",
    "mask_margin_rule",
    "window_pad_value",
    "target_smoothing_vox",
)


def stage_spec(config: ml_collections.ConfigDict) -> StageSpec:
    """The stage definition (`verse_jax.stages`): the paper's, with the grid, K, augmentation and
    the definition fields of `config.data`."""
    d = config.data
    ranges = AugmentRanges(**d.aug.to_dict()) if d.augment else AugmentRanges.none()
    fields = {name: d[name] for name in _SPEC_FIELDS if name in d}
    if "heatmap_value_scale" in d:  # prediction only (StageSpec.candidates.value_scale)
        rule = stages.PAPER[config.stage].candidates
        fields["candidates"] = dataclasses.replace(rule, value_scale=float(d.heatmap_value_scale))
    return stages.with_grid(
        config.stage, stage_grid(config), d.num_landmarks, augment=ranges, **fields
    )


def stage_grid(config: ml_collections.ConfigDict) -> dict:
    d = config.data
    return {
        "spacing_mm": float(d.spacing_mm),
        "crop_size": [int(v) for v in d.crop_size],
        "smoothing_mm": float(d.smoothing_mm),
    }


def resolve_data(d: ml_collections.ConfigDict) -> tuple[Path, list[str], list[str], Path]:
    """`(root, train ids, validation ids, stage cache folder)` from `config.data`.

    Without `d.root` the built-in phantoms are used (generated once into their cache). With
    `root/splits.json`, cross-validation folds split its "train" list and fold "all" validates on
    its "val" list; without it, folds split all cases and "all" has no validation.
    """
    if d.root:
        root = Path(d.root)
    else:
        kwargs = {"num_cases": d.phantom_cases} if d.phantom_cases else {}
        root = Path(phantoms.default_dataset(**kwargs))
    has_splits = (root / "splits.json").is_file()
    split = "train" if has_splits else None
    fold = str(d.fold)
    if fold == "all":
        train_ids = datasets.select_case_ids(root, split=split, fold="all", part="train")
        val_ids = datasets.select_case_ids(root, split="val") if has_splits else []
    elif fold in ("0", "1", "2"):
        fixed = {"fold_file": d.fold_file or None}  # a fixed split instead of the seeded one
        train_ids = datasets.select_case_ids(
            root, split=split, fold=int(fold), part="train", **fixed
        )
        val_ids = datasets.select_case_ids(root, split=split, fold=int(fold), part="val", **fixed)
    else:
        raise ValueError(f"config.data.fold must be 0, 1, 2 or all, got {d.fold!r}")
    cache_dir = Path(d.cache_dir) if d.cache_dir else Path.home() / ".cache/verse-jax/stages"
    return root, train_ids, val_ids, cache_dir


def _init_params(model, config, key):
    shape = (1, *config.data.crop_size, stages.INPUT_CHANNELS[config.stage])
    init = jax.jit(lambda k: model.init(k, jnp.zeros(shape, jnp.float32), train=False))
    return init(key)["params"]


@dataclasses.dataclass
class Trainer:
    """Everything one training run of a stage needs (`create_trainer`).

    Attributes:
        config, stage: what it was built from.
        spec: the stage definition (`stage_spec(config)`).
        root, train_ids, val_ids, cache_dir: the data (`resolve_data`).
        mesh: the device mesh (axis `data`).
        model: the Linen network of the stage.
        optimizer, schedule: the optax transformation and its learning-rate schedule.
        dataset: the Grain training pipeline of this process's shard (raw batches).
        step: the pure train step `(state, batch, rng) -> (state, metrics)` (not jitted).
    """

    config: ml_collections.ConfigDict
    stage: Any
    spec: StageSpec
    root: Path
    train_ids: list[str]
    val_ids: list[str]
    cache_dir: Path
    mesh: jax.sharding.Mesh
    model: Any
    optimizer: optax.GradientTransformation
    schedule: Callable
    dataset: grain.IterDataset
    step: Callable

    def init_state(self) -> train_state.TrainState:
        """The initial train state (params from the config's seed, the stage's sigmas)."""
        sigmas = self.stage.sigmas
        sigmas = None if sigmas is None else jnp.asarray(sigmas, jnp.float32)
        params = _init_params(self.model, self.config, jax.random.key(self.config.seed))
        return train_state.TrainState.create(params, self.optimizer, sigmas)


def create_trainer(config, stage, *, mesh=None, train_ids=None) -> Trainer:
    """Data, network, optimizer and train step of `stage` (a `Stage`) trained with `config`.

    Args:
        config: the stage's config (`experiments/configs/<stage>.py`).
        stage: what the stage script declares (`make_stage(config)`).
        mesh: the device mesh; default all devices (`sharding.make_mesh`).
        train_ids: the training cases; default those of `resolve_data(config.data)`.
    """
    root, default_ids, val_ids, cache_dir = resolve_data(config.data)
    train_ids = default_ids if train_ids is None else list(train_ids)
    spec = stage_spec(config)
    mesh = sharding.make_mesh() if mesh is None else mesh
    local_batch_size = sharding.check_batch_size(config.train.batch_size, mesh)
    model = bundle.build_model(stage.factory, stage.factory_kwargs)
    optimizer, schedule = build_optimizer(config.optim)
    dataset = data_pipeline.make_train_dataset(
        root,
        train_ids,
        spec,
        cache_dir=cache_dir,
        batch_size=local_batch_size,
        seed=config.seed,
        num_workers=config.data.worker_count,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        balance_landmarks=config.data.balance_landmarks,
    )
    landmarks = None
    if stage.uses_training_landmarks:
        landmarks = data_pipeline.training_landmarks(root, train_ids, spec, cache_dir)
    step = train_state.make_train_step(
        stage.make_loss(model.apply, landmarks),
        optimizer,
        device_transform=samples.make_device_transform(spec),
        learning_rate_fn=schedule,
    )
    return Trainer(
        config,
        stage,
        spec,
        root,
        train_ids,
        val_ids,
        cache_dir,
        mesh,
        model,
        optimizer,
        schedule,
        dataset,
        step,
    )
