"""Checkpoints of the train state and the data iterator's position, through orbax.

A checkpoint at step N holds the `TrainState` (params, sigmas, optimizer state, step) and the
state of the Grain iterator after it yielded N batches, so a run killed at any moment and restarted
from the latest checkpoint continues the same batch sequence. The iterator is saved with Grain's
own orbax handler (`grain.checkpoint.CheckpointSave` / `CheckpointRestore`): every process writes
its own `data/process_<i>-of-<n>.json`, so a multi-host run restores each process's position in
its shard. Orbax writes each step to a temporary folder and renames it when complete; a
half-written checkpoint is never restored.

With `rank_fn`, checkpoints saved with validation metrics are also ranked (orbax's `best_fn` and a
`preservation_policy`): the newest `max_to_keep` checkpoints are kept as usual, and so is the best
one, however old (`best_step()`); the ranking is stored with each checkpoint and survives restarts.
"""

import logging
from pathlib import Path
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores `(TrainState, data iterator position)` pairs in `directory/<step>/`.

    Args:
        directory: folder of the checkpoints (created if missing), e.g. `<workdir>/checkpoints`.
        max_to_keep: how many of the newest checkpoints are kept.
        async_save: write files in a background thread (the device-to-host copy is synchronous,
            so the caller may donate the state right after `save`).
        rank_fn: `metrics -> sortable key`, larger is better (e.g. a tuple); when given, the
            best checkpoint saved with metrics is kept besides the newest `max_to_keep`.
    """

    def __init__(self, directory, *, max_to_keep: int = 2, async_save: bool = True, rank_fn=None):
        self.directory = Path(directory).absolute()
        common = dict(create=True, enable_async_checkpointing=async_save)
        if rank_fn is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **common)
        else:
            policies = ocp.checkpoint_managers
            keep = policies.AnyPreservationPolicy(
                [
                    policies.LatestN(n=max_to_keep),
                    policies.BestN(
                        get_metric_fn=rank_fn, n=1, keep_checkpoints_without_metrics=False
                    ),
                ]
            )
            options = ocp.CheckpointManagerOptions(
                best_fn=rank_fn, best_mode="max", preservation_policy=keep, **common
            )
        self._ranked = rank_fn is not None
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step of the best checkpoint saved with metrics (needs `rank_fn`), or None."""
        if not self._ranked:
            return None
        return self._manager.best_step()

    def save(self, state, iterator, metrics: dict | None = None) -> None:
        """Saves `state` (a TrainState) under its own step with the Grain `iterator`'s position.

        Args:
            state: the train state.
            iterator: this process's Grain iterator (its state is taken now, synchronously).
            metrics: JSON-able dict ranked by `rank_fn`, stored with the checkpoint when given.
        """
        step = int(jax.device_get(state.step))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
        )
        self._manager.save(step, args=args, force=True, metrics=metrics if self._ranked else None)
        log.info("checkpoint at step %d -> %s", step, self.directory)

    def restore(self, abstract_state, iterator, step: int | None = None) -> Any:
        """Restores the checkpoint `step` (default: latest): the state, and `iterator`'s position.

        Args:
            abstract_state: `jax.ShapeDtypeStruct` tree of the TrainState (`jax.eval_shape` of
                the initialiser), with shardings where the arrays should land.
            iterator: this process's Grain iterator; set to the position this process saved.
            step: which checkpoint; None for the newest.

        Returns:
            The restored state.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint to restore in {self.directory}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(iterator),
        )
        restored = self._manager.restore(step, args=args)
        log.info("restored checkpoint of step %d from %s", step, self.directory)
        return restored["state"]

    def wait(self) -> None:
        """Blocks until background writes are finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
