"""What the three training scripts share: `run` (the training loop around a trainer) and `main`.

A stage script describes only what differs (`trainer.Stage`: network factory, loss, validation)
and calls `run(config, workdir, stage)`, which writes `config.json`, builds everything with
`trainer.create_trainer` and runs `train`: initialise or resume from `<workdir>/checkpoints`, run
`verse_jax.train.loop.fit` and export the stage for inference twice: `<workdir>/export` holds the
step that is best on the stage's validation metric (`Stage.select`, see `experiments/selection.py`;
rewritten whenever a validation improves on it) and `<workdir>/export-last` the last step (at every
checkpoint and at the end). Without validation cases both hold the last step. A resumed run takes
the best so far from `export`.
"""

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments.selection import Best, checkpoint_metrics, rank_fn
from experiments.trainer import Stage, Trainer, create_trainer, stage_spec
from verse_jax import io
from verse_jax.data import pipeline as data_pipeline
from verse_jax.data import samples
from verse_jax.data.cache import load_stage_case, prepare_stage_cases
from verse_jax.geometry import Volume
from verse_jax.infer import bundle
from verse_jax.io import files
from verse_jax.models.registry import StageNetwork
from verse_jax.stages import StageSpec
from verse_jax.train import checkpoint, sharding
from verse_jax.train import loop as train_loop
from verse_jax.train import state as train_state

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


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """`<workdir>/config.json` (atomic)."""
    files.write_text_atomic(
        workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    )


def local_batches(iterator, mesh: jax.sharding.Mesh):
    """This process's raw batches from Grain (its shard) -> global arrays sharded on `data`."""
    for batch in iterator:
        yield sharding.shard_batch(batch, mesh)


def replicated(tree, ctx: Context):
    """`tree` on every device of the mesh (validation inputs next to the replicated params)."""
    return jax.device_put(tree, NamedSharding(ctx.mesh, PartitionSpec()))


def val_cases(ctx: Context) -> list:
    """The held-out cases with landmarks, on the stage grid (`data.cache.StageCase`, cached)."""
    by_id = {case.case_id: case for case in io.find_cases(ctx.root)}
    ids = ctx.val_ids[: ctx.config.eval.max_cases or None]
    paths = prepare_stage_cases([by_id[i] for i in ids], ctx.spec, ctx.cache_dir)
    return [case for case in map(load_stage_case, paths) if case.valid.any()]


def stage_volume(case) -> Volume:
    """A cached stage case's normalised CT as a float32 Volume on the stage grid."""
    return Volume(np.asarray(case.image, np.float32), case.geometry)


def stage_network(ctx: Context, state: train_state.TrainState) -> StageNetwork:
    """The current parameters as the predictors' input (network, params, stage definition)."""
    return StageNetwork(spec=ctx.spec, model=ctx.model, params=state.params)


def eval_batches(ctx: Context, *, batch_size: int = 1) -> list[dict]:
    """The held-out items (stage crops, identity transform) as device batches, computed once."""
    ids = ctx.val_ids[: ctx.config.eval.max_cases or None]
    dataset = data_pipeline.make_eval_dataset(
        ctx.root, ids, ctx.spec, cache_dir=ctx.cache_dir, batch_size=batch_size
    )
    transform = jax.jit(samples.make_device_transform(ctx.spec, train=False))
    return [replicated(transform(batch), ctx) for batch in dataset]


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


def run(config: ml_collections.ConfigDict, workdir, stage: Stage) -> train_state.TrainState:
    """Trains (or resumes) one stage into `workdir`; returns the final TrainState."""
    if config.distributed:
        jax.distributed.initialize()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        write_config(config, workdir)
    return train(create_trainer(config, stage), workdir)


def train(trainer: Trainer, workdir) -> train_state.TrainState:
    """The training loop of `trainer` in `workdir`: resumes from its checkpoints, validates,
    checkpoints and exports (see the module doc); returns the final TrainState."""
    config, stage, spec, mesh = trainer.config, trainer.stage, trainer.spec, trainer.mesh
    workdir = Path(workdir)
    main_process = jax.process_index() == 0
    log.info(
        "stage %s (%s): %d training, %d validation cases from %s; %d device(s)",
        config.stage,
        config.preset,
        len(trainer.train_ids),
        len(trainer.val_ids),
        trainer.root,
        mesh.size,
    )
    iterator = iter(trainer.dataset)
    started = time.perf_counter()
    selection = stage.selection() if trainer.val_ids else None
    state, ckpt = _init_or_restore(trainer, workdir, iterator, selection)
    resumed = int(state.step) > 0
    step = trainer.step
    ctx = Context(
        config, trainer.root, trainer.val_ids, spec, trainer.cache_dir, trainer.model, mesh
    )
    evaluate = stage.make_evaluate(ctx) if trainer.val_ids else None
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
        ckpt.save(s, iterator, None if values is None else checkpoint_metrics(values, step))
        export_last(s)

    def export_last(s):
        extra = {"selected": "last", "val": last_eval.get("values", {})}
        extra["val_step"] = last_eval.get("step")
        export(s, workdir / "export-last", extra)
        exported_last[:] = [int(s.step)]
        if best is None:  # no validation (or no selection rule): the best is the last
            export(s, workdir / "export", extra)

    t = config.train
    writer = train_loop.MetricWriter(
        workdir,
        total_steps=t.num_steps,
        start_step=int(state.step),
        eval_note=None if best is None else (lambda: f"best {best.describe()}"),
    )
    try:
        state = train_loop.fit(
            state,
            jax.jit(step, donate_argnums=0),
            local_batches(iterator, mesh),
            rng=jax.random.key(config.seed),
            loop=train_loop.LoopSchedule(
                t.num_steps, t.log_every, t.eval_every, t.checkpoint_every
            ),
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


def _init_or_restore(trainer: Trainer, workdir: Path, iterator, selection=None):
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints",
        max_to_keep=trainer.config.train.max_to_keep,
        rank_fn=None if selection is None else rank_fn(selection),
    )
    if ckpt.latest_step() is None:
        return sharding.replicate(trainer.init_state(), trainer.mesh), ckpt
    abstract = sharding.abstract_like(jax.eval_shape(trainer.init_state), trainer.mesh)
    state = ckpt.restore(abstract, iterator)
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
