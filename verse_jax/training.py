"""Training: train state, pure train steps, per-stage losses, data parallelism and the `fit` loop.

A step is a pure function `train_step(state, batch, rng) -> (state, metrics)` built by
`make_train_step`; the caller jits it with `donate_argnums=0`. Randomness comes from
`jax.random.fold_in(rng, state.step)`, so a resumed run draws the same numbers as an uninterrupted
one. The on-device augmentation (`device_transform`) runs inside the same step, so one XLA program
does augmentation, loss, gradients and the optimizer update.

Batches are `(batch, x, y, z, channels)` float32 arrays as delivered by `verse_jax.data` (see the
per-stage formats there); landmarks are `landmarks_vox (batch, K, 3)` continuous voxel indices of
the crop with `valid (batch, K)` flags.
"""

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from verse_jax import heatmaps, losses

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(params, sigmas, batch, rng) -> (scalar loss, flat dict of scalar metrics)
LossFn = Callable[[Any, jax.Array | None, Batch, jax.Array], tuple[jax.Array, Metrics]]

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed as a whole).

    Attributes:
        step: int32 scalar, number of updates applied so far.
        params: the network's Flax params pytree.
        sigmas: (K,) float32 learnable heatmap sigmas in voxels (SCN), or None.
        opt_state: optax state of the optimizer over `{"params": params, "sigmas": sigmas}`.
    """

    step: jax.Array
    params: Any
    sigmas: jax.Array | None
    opt_state: Any

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, sigmas=None) -> "TrainState":
        """A fresh state at step 0 (sigmas, if given, are optimised together with params)."""
        trainable = {"params": params, "sigmas": sigmas}
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            sigmas=sigmas,
            opt_state=optimizer.init(trainable),
        )


def piecewise_constant_tf(
    base_lr: float, boundaries: tuple[int, ...], scales: tuple[float, ...]
) -> optax.Schedule:
    """TF1 `piecewise_constant` learning-rate schedule.

    `lr(step) = base_lr * scales[i]` where `i` is the number of boundaries that `step` has passed
    strictly (`step > boundary`, TF semantics; optax's own schedule switches at `step >= boundary`).
    `scales` are absolute factors, e.g. `(10_000, 15_000)` with `(0.5, 0.1)`.
    """
    if len(boundaries) != len(scales):
        raise ValueError(f"need one scale per boundary, got {boundaries} and {scales}")
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"boundaries must be increasing, got {boundaries}")
    values = jnp.asarray((1.0, *scales), jnp.float32) * base_lr
    bounds = jnp.asarray(boundaries, jnp.int32)

    def schedule(count):
        passed = jnp.sum((jnp.asarray(count, jnp.int32) > bounds).astype(jnp.int32))
        return values[passed]

    return schedule


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    device_transform: Callable[[Batch], Batch] | None = None,
    learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Builds the pure training step; jit it with `jax.jit(step, donate_argnums=0)`.

    Args:
        loss_fn: `(params, sigmas, batch, rng) -> (loss, metrics)`, e.g. from `make_scn_loss`.
        optimizer: optax transformation over `{"params": ..., "sigmas": ...}`.
        device_transform: applied to the raw batch first (the on-device augmentation).
        learning_rate_fn: if given, the step's learning rate is reported as metric `lr`.

    Returns:
        `train_step(state, batch, rng) -> (state, metrics)`; metrics is a flat dict of scalars
        (`loss`, the loss terms, `grad_norm`, `lr`).
    """

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if device_transform is not None:
            batch = device_transform(batch)
        trainable = {"params": state.params, "sigmas": state.sigmas}

        def objective(trainable):
            return loss_fn(trainable["params"], trainable["sigmas"], batch, rng)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        if learning_rate_fn is not None:
            metrics["lr"] = learning_rate_fn(state.step)
        new_state = state.replace(
            step=state.step + 1,
            params=trainable["params"],
            sigmas=trainable["sigmas"],
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


def make_spine_loss(apply_fn, *, weight_decay: float = 5e-4, sigma_vox: float = 3.0):
    """Stage 1 loss: `0.5 * sum((pred - spine_heatmap)^2) / batch + weight decay`.

    `apply_fn` is the U-Net's `model.apply`; the batch holds `image (B, x, y, z, 1)`,
    `landmarks_vox (B, K, 3)` and `valid (B, K)`. The target is `heatmaps.spine_heatmap` with
    `sigma_vox` for both the landmark Gaussians and the blur.
    """

    def loss_fn(params, sigmas, batch, rng):
        del sigmas
        image = batch["image"]
        pred = apply_fn({"params": params}, image, train=True, rngs={"dropout": rng})
        shape = tuple(image.shape[1:4])
        target = jax.vmap(
            lambda p, v: heatmaps.spine_heatmap(
                p, v, shape, sigma_vox=sigma_vox, blur_sigma_vox=sigma_vox
            )
        )(batch["landmarks_vox"], batch["valid"])
        data = losses.heatmap_l2(pred, target[..., None]) / image.shape[0]
        reg = losses.weight_decay(params, weight_decay)
        return data + reg, {"loss_heatmap": data, "loss_reg": reg}

    return loss_fn


def make_scn_loss(
    apply_fn, *, weight_decay: float = 5e-4, sigma_weight: float = 100.0, scale: float = 1000.0
):
    """Stage 2 loss: masked heatmap L2 + sigma regulariser + weight decay (TF sum semantics).

    The targets are `heatmaps.gaussian_heatmaps(landmarks_vox, valid, sigmas, scale=scale)` built
    here, so gradients reach the learnable sigmas (K,) (voxels). The batch holds
    `image (B, x, y, z, 1)`, `landmarks_vox (B, K, 3)`, `valid (B, K)` and `mask (B, x, y, z, 1)`.
    Data and sigma terms are averaged over the batch (the paper used batch 1).
    """

    def loss_fn(params, sigmas, batch, rng):
        image = batch["image"]
        out = apply_fn({"params": params}, image, train=True, rngs={"dropout": rng})
        shape = tuple(image.shape[1:4])
        target = jax.vmap(
            lambda p, v: heatmaps.gaussian_heatmaps(p, v, sigmas, shape, scale=scale)
        )(batch["landmarks_vox"], batch["valid"])
        batch_size = image.shape[0]
        data = losses.heatmap_l2(out.heatmaps, target, batch["mask"]) / batch_size
        sig = jax.vmap(lambda v: losses.sigma_regularizer(sigmas, v, sigma_weight))(batch["valid"])
        sig = jnp.mean(sig)
        reg = losses.weight_decay(params, weight_decay)
        metrics = {
            "loss_heatmap": data,
            "loss_sigmas": sig,
            "loss_reg": reg,
            "sigma_mean": jnp.mean(sigmas),
        }
        return data + sig + reg, metrics

    return loss_fn


def make_seg_loss(apply_fn, *, weight_decay: float = 1e-6, dice_weight: float = 0.0):
    """Stage 3 loss: mean sigmoid cross-entropy of `label (B, x, y, z, 1)` + weight decay.

    `dice_weight` > 0 adds `dice_weight * losses.soft_dice_loss` (not in the paper, which uses the
    cross-entropy alone; the demo presets use it so that the small network leaves the all-background
    answer within the first hundred steps).
    """

    def loss_fn(params, sigmas, batch, rng):
        del sigmas
        logits = apply_fn({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        data = losses.sigmoid_cross_entropy(logits, batch["label"])
        reg = losses.weight_decay(params, weight_decay)
        terms = {"loss_xent": data, "loss_reg": reg}
        if dice_weight > 0:
            dice = losses.soft_dice_loss(logits, batch["label"])
            terms["loss_dice"] = dice
            data = data + dice_weight * dice
        return data + reg, terms

    return loss_fn


# --- data parallelism -------------------------------------------------------------------------


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis `data` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Returns the per-process batch size; ValueError if the batch does not split evenly."""
    if global_batch_size < 1 or global_batch_size % mesh.size:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the number of "
            f"devices ({mesh.size})"
        )
    return global_batch_size // jax.process_count()


def replicate(tree, mesh: Mesh):
    """Puts every leaf of `tree` on all devices of `mesh` (parameters, optimizer state)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch, mesh: Mesh):
    """This process's rows of the global batch (a pytree of arrays with a leading batch axis) ->
    global arrays split over the mesh's `data` axis."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    put = lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.tree.map(put, batch)


def abstract_like(state, mesh: Mesh):
    """`jax.ShapeDtypeStruct` tree of `state` (e.g. from `jax.eval_shape`), replicated on `mesh`."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


# --- metrics ----------------------------------------------------------------------------------


def _jsonable(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class MetricWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and shows progress.

    One JSON object per line: `{"step", "kind": "train"|"eval", "time", <scalars>}` (non-finite
    values as null; eval scalars prefixed `val/`). Progress is a tqdm bar with loss and steps/s
    when `progress` is true (default: stderr is a terminal), plain INFO log lines otherwise.
    Resuming at `start_step` drops records of later steps left by the interrupted run.
    `eval_note() -> str`, when given, is appended to each validation log line (e.g. the best so
    far).
    """

    def __init__(
        self, workdir, *, total_steps: int, start_step: int = 0, progress=None, eval_note=None
    ):
        self._eval_note = eval_note
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_records_after(self.path, start_step)
        self._file = self.path.open("a")
        self._total = total_steps
        self._last = (start_step, time.perf_counter())
        if progress is None:
            progress = sys.stderr.isatty()
        self._bar = None
        if progress:
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step")

    def _append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_train(self, step: int, scalars: Mapping[str, float]) -> None:
        """Training scalars at completed step `step` (means over the logging interval)."""
        now = time.perf_counter()
        last_step, last_time = self._last
        rate = (step - last_step) / max(now - last_time, 1e-9)
        self._last = (step, now)
        record = {k: _jsonable(v) for k, v in scalars.items()}
        self._append(
            {"step": step, "kind": "train", "time": time.time(), **record, "steps_per_s": rate}
        )
        loss = scalars.get("loss", float("nan"))
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4g}", steps_per_s=f"{rate:.3g}")
        else:
            log.info("step %d/%d  loss %.5g  %.3g steps/s", step, self._total, loss, rate)

    def write_eval(self, step: int, scalars: Mapping[str, float]) -> None:
        """Validation scalars at completed step `step`; also logged at INFO."""
        record = {f"val/{k}": _jsonable(v) for k, v in scalars.items()}
        self._append({"step": step, "kind": "eval", "time": time.time(), **record})
        text = ", ".join(f"{k} {float(v):.4g}" for k, v in scalars.items())
        if self._eval_note is not None:
            text += f"; {self._eval_note()}"
        log.info("validation at step %d: %s", step, text)
        self._last = (self._last[0], time.perf_counter())  # do not count validation in steps/s

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites `path` (atomically) without records of steps after `step`."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# --- the loop ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopSchedule:
    """When `fit` logs, validates and checkpoints (every N completed steps; 0 = only at the end)."""

    num_steps: int
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0

    def due(self, every: int, done: int) -> bool:
        return done == self.num_steps or (every > 0 and done % every == 0)


def _flush(pending: list[tuple[int, Metrics]]) -> tuple[int, dict[str, float]]:
    """Pulls buffered step metrics to the host; raises on the first non-finite loss."""
    host = jax.device_get(pending)
    for done, metrics in host:
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss}) at step {done}; stopping. Terms: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))
            )
    keys = host[-1][1].keys()
    mean = {k: float(np.mean([m[k] for _, m in host])) for k in keys}
    pending.clear()
    return host[-1][0], mean


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]],
    batches: Iterator[Batch],
    *,
    rng: jax.Array,
    loop: LoopSchedule,
    writer: MetricWriter,
    evaluate: Callable[[TrainState], Mapping[str, float]] | None = None,
    save: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Runs `train_step` from `state.step` up to `loop.num_steps`, the one loop of all stages.

    Metrics stay on the device until they are logged (every `loop.log_every` steps: mean over the
    interval). Before each validation (`evaluate(state) -> scalars`, written with prefix `val/`)
    and each checkpoint (`save(state)`), buffered losses are checked, so a non-finite loss stops
    the run (FloatingPointError naming the step) before it reaches a checkpoint. All three happen
    at the last step too. `batches` must yield device-ready batches (see `shard_batch`).
    """
    start = int(jax.device_get(state.step))
    pending: list[tuple[int, Metrics]] = []
    for done in range(start + 1, loop.num_steps + 1):
        state, metrics = train_step(state, next(batches), rng)
        pending.append((done, metrics))
        if len(pending) >= 3:  # bound how far the host runs ahead of the device
            jax.block_until_ready(pending[-3][1]["loss"])
        log_now = loop.due(loop.log_every, done)
        eval_now = evaluate is not None and loop.due(loop.eval_every, done)
        save_now = save is not None and loop.due(loop.checkpoint_every, done)
        if pending and (log_now or eval_now or save_now):
            writer.write_train(*_flush(pending))
        if eval_now:
            writer.write_eval(done, evaluate(state))
        if save_now:
            save(state)
    if pending:
        writer.write_train(*_flush(pending))
    return state
