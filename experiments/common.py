"""What the three training scripts share: config -> data, model, optimizer; `run`; `main`.

A stage script describes only what differs (`Stage`: network factory, loss, validation) and calls
`run(config, workdir, stage)`, which writes `config.json`, builds the mesh and the Grain pipeline,
initialises or resumes from `<workdir>/checkpoints`, runs `verse_jax.training.fit` and exports the
stage for inference twice: `<workdir>/export` holds the step that is best on the stage's validation
metric (`Stage.select`, see `experiments/selection.py`; rewritten whenever a validation improves
on it) and `<workdir>/export-last` the last step (at every checkpoint and at the end). Without
validation cases both hold the last step. A resumed run takes the best so far from `export`.
"""

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from experiments.selection import Best, Selection, checkpoint_metrics, rank_fn
from verse_jax import bundle, checkpoint, data, io, phantoms, samples, stages, training
from verse_jax.augmentation import AugmentRanges
from verse_jax.geometry import Volume
from verse_jax.stage_cache import load_stage_case, prepare_stage_cases
from verse_jax.stages import StageSpec

log = logging.getLogger("experiments")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass(frozen=True)
class Context:
    """What a stage's validation needs (built by `run`)."""

    config: ml_collections.ConfigDict
    root: Path
    val_ids: list[str]
    spec: StageSpec
    cache_dir: Path
    model: Any
    mesh: jax.sharding.Mesh
    factory: str
    factory_kwargs: dict


@dataclasses.dataclass(frozen=True)
class Stage:
    """What differs between the stages.

    Attributes:
        factory: network factory name (`verse_jax.stages.FACTORIES`).
        factory_kwargs: its keyword arguments, from the config.
        make_loss: `model.apply -> loss_fn` (`verse_jax.training.make_*_loss` with config values).
        make_evaluate: `Context -> (TrainState -> {metric: float})` on the validation cases.
        sigmas: (K,) initial learnable sigmas (SCN) or None.
        select: `(metric, "max"|"min")`: the validation value that picks the exported step.
        tie_break: a second `(metric, mode)` for equal values of the first.
    """

    factory: str
    factory_kwargs: dict
    make_loss: Callable[[Callable], training.LossFn]
    make_evaluate: Callable[[Context], Callable[[training.TrainState], dict]]
    sigmas: np.ndarray | None = None
    select: tuple[str, str] | None = None
    tie_break: tuple[str, str] | None = None

    def selection(self) -> Selection | None:
        return None if self.select is None else Selection(*self.select, self.tie_break)


def build_optimizer(optim: ml_collections.ConfigDict):
    """`(optax transformation, learning-rate schedule)` from `config.optim`."""
    schedule = training.piecewise_constant_tf(
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
        train_ids = data.select_case_ids(root, split=split, fold="all", part="train")
        val_ids = data.select_case_ids(root, split="val") if has_splits else []
    elif fold in ("0", "1", "2"):
        fixed = {"fold_file": d.fold_file or None}  # a fixed split instead of the seeded one
        train_ids = data.select_case_ids(root, split=split, fold=int(fold), part="train", **fixed)
        val_ids = data.select_case_ids(root, split=split, fold=int(fold), part="val", **fixed)
    else:
        raise ValueError(f"config.data.fold must be 0, 1, 2 or all, got {d.fold!r}")
    cache_dir = Path(d.cache_dir) if d.cache_dir else Path.home() / ".cache/verse-jax/stages"
    return root, train_ids, val_ids, cache_dir


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """`<workdir>/config.json` (atomic)."""
    path = workdir / "config.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def local_batches(iterator, mesh: jax.sharding.Mesh):
    """This process's raw batches from Grain (its shard) -> global arrays sharded on `data`."""
    for batch in iterator:
        yield training.shard_batch(batch, mesh)


def replicated(tree, ctx: Context):
    """`tree` on every device of the mesh (validation inputs next to the replicated params)."""
    return jax.device_put(tree, NamedSharding(ctx.mesh, PartitionSpec()))


def val_cases(ctx: Context) -> list:
    """The held-out cases with landmarks, on the stage grid (`stage_cache.StageCase`, cached)."""
    by_id = {case.case_id: case for case in io.find_cases(ctx.root)}
    ids = ctx.val_ids[: ctx.config.eval.max_cases or None]
    paths = prepare_stage_cases([by_id[i] for i in ids], ctx.spec, ctx.cache_dir)
    return [case for case in map(load_stage_case, paths) if case.valid.any()]


def stage_volume(case) -> Volume:
    """A cached stage case's normalised CT as a float32 Volume on the stage grid."""
    return Volume(np.asarray(case.image, np.float32), case.geometry)


def stage_model(ctx: Context, state: training.TrainState) -> bundle.StageModel:
    """The current parameters as the inference pipeline's stage (what `export_stage` would load)."""
    return bundle.StageModel(
        spec=ctx.spec,
        model=ctx.model,
        params=state.params,
        factory=ctx.factory,
        factory_kwargs=ctx.factory_kwargs,
        sigmas=None if state.sigmas is None else np.asarray(jax.device_get(state.sigmas)),
        extra={},
    )


def eval_batches(ctx: Context, *, batch_size: int = 1) -> list[dict]:
    """The held-out items (stage crops, identity transform) as device batches, computed once."""
    ids = ctx.val_ids[: ctx.config.eval.max_cases or None]
    dataset = data.make_eval_dataset(
        ctx.root, ids, ctx.spec, cache_dir=ctx.cache_dir, batch_size=batch_size
    )
    transform = jax.jit(samples.make_device_transform(ctx.spec))
    return [replicated(transform(batch), ctx) for batch in dataset]


def _init_params(model, config, key):
    shape = (1, *config.data.crop_size, stages.INPUT_CHANNELS[config.stage])
    init = jax.jit(lambda k: model.init(k, jnp.zeros(shape, jnp.float32), train=False))
    return init(key)["params"]


def _export(state, config, out_dir: Path, stage: Stage, extra: dict) -> None:
    bundle.export_stage(
        out_dir,
        spec=stage_spec(config),
        factory=stage.factory,
        factory_kwargs=stage.factory_kwargs,
        params=jax.device_get(state.params),
        sigmas=None if state.sigmas is None else np.asarray(jax.device_get(state.sigmas)),
        extra={"step": int(state.step), "preset": config.preset, **extra},
    )


def run(config: ml_collections.ConfigDict, workdir, stage: Stage) -> training.TrainState:
    """Trains (or resumes) one stage into `workdir`; returns the final TrainState."""
    if config.distributed:
        jax.distributed.initialize()
    workdir = Path(workdir)
    main_process = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if main_process:
        write_config(config, workdir)
    root, train_ids, val_ids, cache_dir = resolve_data(config.data)
    spec = stage_spec(config)
    mesh = training.make_mesh()
    local_batch_size = training.check_batch_size(config.train.batch_size, mesh)
    log.info(
        "stage %s (%s): %d training, %d validation cases from %s; %d device(s)",
        config.stage,
        config.preset,
        len(train_ids),
        len(val_ids),
        root,
        mesh.size,
    )
    model = bundle.build_model(stage.factory, stage.factory_kwargs)
    optimizer, schedule = build_optimizer(config.optim)
    dataset = data.make_train_dataset(
        root,
        train_ids,
        spec,
        cache_dir=cache_dir,
        batch_size=local_batch_size,
        seed=config.seed,
        num_workers=config.data.worker_count,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    iterator = iter(dataset)
    started = time.perf_counter()
    selection = stage.selection() if val_ids else None
    state, ckpt = _init_or_restore(
        config, workdir, stage, model, optimizer, mesh, iterator, selection
    )
    resumed = int(state.step) > 0
    step = training.make_train_step(
        stage.make_loss(model.apply),
        optimizer,
        device_transform=samples.make_device_transform(spec),
        learning_rate_fn=schedule,
    )
    ctx = Context(
        config, root, val_ids, spec, cache_dir, model, mesh, stage.factory, stage.factory_kwargs
    )
    evaluate = stage.make_evaluate(ctx) if val_ids else None
    last_eval: dict = {}  # {"step", "values"} of the latest validation
    best = Best(selection) if selection else None
    if best is not None and resumed:
        best = Best.from_export(selection, workdir / "export")
        log.info("best so far (from %s): %s", workdir / "export", best.describe())
    seconds_before = _train_seconds(workdir / "export-last") if resumed else 0.0

    def export(s, out_dir, extra):
        if main_process:
            seconds = seconds_before + time.perf_counter() - started
            _export(s, config, out_dir, stage, {**extra, "train_seconds": round(seconds, 1)})

    def evaluate_and_keep(s):
        step, values = int(s.step), dict(evaluate(s))
        last_eval.update(step=step, values=values)
        if best is not None and best.offer(step, values):
            export(
                s, workdir / "export", {"selected": "best", **selection.describe(), "val": values}
            )
        return values

    exported_last: list[int] = []  # step of the latest export-last of this run

    def save(s):
        step = int(s.step)
        values = last_eval.get("values") if last_eval.get("step") == step else None
        ckpt.save(
            s, iterator.get_state(), None if values is None else checkpoint_metrics(values, step)
        )
        export_last(s)

    def export_last(s):
        extra = {"selected": "last", "val": last_eval.get("values", {})}
        extra["val_step"] = last_eval.get("step")
        export(s, workdir / "export-last", extra)
        exported_last[:] = [int(s.step)]
        if best is None:  # no validation (or no selection rule): the best is the last
            export(s, workdir / "export", extra)

    t = config.train
    writer = training.MetricWriter(
        workdir,
        total_steps=t.num_steps,
        start_step=int(state.step),
        eval_note=None if best is None else (lambda: f"best {best.describe()}"),
    )
    try:
        state = training.fit(
            state,
            jax.jit(step, donate_argnums=0),
            local_batches(iterator, mesh),
            rng=jax.random.key(config.seed),
            loop=training.LoopSchedule(t.num_steps, t.log_every, t.eval_every, t.checkpoint_every),
            writer=writer,
            evaluate=evaluate_and_keep if evaluate else None,
            save=save,
        )
    finally:
        writer.close()
        ckpt.close()
    if exported_last != [int(state.step)]:
        export_last(state)
    if best is not None and best.step is None:  # never validated (e.g. resumed at the end)
        export(state, workdir / "export", {"selected": "last", "val": {}})
    return state


def _train_seconds(export_dir: Path) -> float:
    """Training seconds recorded in an export (0 if none): a resumed run adds its own."""
    path = export_dir / "stage.json"
    if not path.is_file():
        return 0.0
    return float((json.loads(path.read_text()).get("extra") or {}).get("train_seconds") or 0.0)


def _init_or_restore(config, workdir, stage, model, optimizer, mesh, iterator, selection=None):
    sigmas = None if stage.sigmas is None else jnp.asarray(stage.sigmas, jnp.float32)

    def init():
        params = _init_params(model, config, jax.random.key(config.seed))
        return training.TrainState.create(params, optimizer, sigmas)

    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints",
        max_to_keep=config.train.max_to_keep,
        rank_fn=None if selection is None else rank_fn(selection),
    )
    if ckpt.latest_step() is None:
        return training.replicate(init(), mesh), ckpt
    state, data_state = ckpt.restore(training.abstract_like(jax.eval_shape(init), mesh))
    iterator.set_state(data_state)
    log.info("resuming from step %d in %s", int(state.step), workdir)
    return state, ckpt


def setup_logging() -> None:
    """INFO log lines with time stamps; quiet third-party INFO chatter (orbax, absl)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # replace absl's handler: one line per message
    )
    logging.getLogger().setLevel(logging.INFO)
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(stage_name: str, train_and_evaluate) -> None:
    """Command line of a stage script: `--config=...:preset`, `--config.x.y=...`, `--workdir`."""
    from absl import app, flags
    from ml_collections import config_flags
    from tqdm.contrib.logging import logging_redirect_tqdm

    config_flag = config_flags.DEFINE_config_file(
        "config", default=f"{CONFIG_DIR / stage_name}.py:demo", help_string="config file:preset"
    )
    workdir_flag = flags.DEFINE_string(
        "workdir",
        None,
        "work directory (default runs/<stage>-<preset>); resumes if it holds a checkpoint",
    )

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        setup_logging()
        config = config_flag.value
        workdir = workdir_flag.value or f"runs/{config.stage}-{config.preset}"
        with logging_redirect_tqdm():
            train_and_evaluate(config, workdir)
        log.info(
            "done; metrics in %s, best export in %s, last in %s",
            Path(workdir) / "metrics.jsonl",
            Path(workdir) / "export",
            Path(workdir) / "export-last",
        )

    app.run(_main)


def summary(values: list[float]) -> float:
    """Mean of finite values (nan if none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
