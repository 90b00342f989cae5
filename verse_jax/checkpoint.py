"""Checkpoints of the train state and the data iterator's position, through orbax.

A checkpoint at step N holds the `TrainState` (params, sigmas, optimizer state, step) and the JSON
state of the Grain iterator after it yielded N batches, so a run killed at any moment and restarted
from the latest checkpoint continues the same batch sequence. Orbax writes each step to a
temporary folder and renames it when complete; a half-written checkpoint is never restored.
"""

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _encode_data_state(data_state) -> dict:
    """Grain iterator state (dict for datasets, bytes for `DataLoader`) -> JSON-able dict."""
    if data_state is None:
        return {"kind": "none"}
    if isinstance(data_state, bytes):
        return {"kind": "bytes", "value": data_state.decode("utf-8")}
    if isinstance(data_state, dict):
        return {"kind": "dict", "value": data_state}
    raise ValueError(f"cannot checkpoint a data iterator state of type {type(data_state).__name__}")


def _decode_data_state(record: dict):
    kind = record.get("kind")
    if kind == "none":
        return None
    if kind == "bytes":
        return record["value"].encode("utf-8")
    if kind == "dict":
        return record["value"]
    raise ValueError(f"checkpoint data state has unknown kind {kind!r}")


class Checkpointer:
    """Saves and restores `(TrainState, data iterator state)` pairs in `directory/<step>/`.

    Args:
        directory: folder of the checkpoints (created if missing), e.g. `<workdir>/checkpoints`.
        max_to_keep: how many of the newest checkpoints are kept.
        async_save: write files in a background thread (the device-to-host copy is synchronous,
            so the caller may donate the state right after `save`).
    """

    def __init__(self, directory, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, state, data_state=None) -> None:
        """Saves `state` (a TrainState) under its own step with the iterator's `get_state()`."""
        step = int(jax.device_get(state.step))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
        )
        self._manager.save(step, args=args, force=True)
        log.info("checkpoint at step %d -> %s", step, self.directory)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, Any]:
        """Restores the checkpoint `step` (default: latest) into `abstract_state`'s structure.

        Args:
            abstract_state: `jax.ShapeDtypeStruct` tree of the TrainState (`jax.eval_shape` of
                the initialiser), with shardings where the arrays should land.
            step: which checkpoint; None for the newest.

        Returns:
            `(state, data_state)`; data_state is what the iterator's `get_state()` returned.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint to restore in {self.directory}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        log.info("restored checkpoint of step %d from %s", step, self.directory)
        return restored["state"], _decode_data_state(restored["data"])

    def wait(self) -> None:
        """Blocks until background writes are finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
