"""Train state, the TF piecewise-constant schedule and the pure train step.

A step is a pure function `train_step(state, batch, rng) -> (state, metrics)` built by
`make_train_step`; the caller jits it with `donate_argnums=0`. Randomness comes from
`jax.random.fold_in(rng, state.step)`, so a resumed run draws the same numbers as an uninterrupted
one. The on-device augmentation (`device_transform`) runs inside the same step, so one XLA program
does augmentation, loss, gradients and the optimizer update. The stage losses are in
`verse_jax.train.stage_losses`, the loop in `verse_jax.train.loop`.
"""

import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

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
