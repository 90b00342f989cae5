"""Checkpoints: each process of a multi-host run restores its own Grain iterator position."""

import grain
import jax
import jax.numpy as jnp
import optax
from grain._src.core import sharding as grain_sharding  # the process index Grain's handler reads

from verse_jax.train import checkpoint, sharding
from verse_jax.train import state as train_state


def _as_process(monkeypatch, index: int, count: int = 2) -> None:
    monkeypatch.setattr(grain_sharding, "get_process_index_and_count", lambda: (index, count))


def test_two_processes_restore_their_own_iterator_positions(tmp_path, monkeypatch):
    dataset = grain.MapDataset.range(20).to_iter_dataset()
    iterators = [iter(dataset), iter(dataset)]
    for _ in range(3):
        next(iterators[0])
    for _ in range(7):
        next(iterators[1])
    optimizer = optax.sgd(0.1)
    init = lambda: train_state.TrainState.create({"w": jnp.ones(2)}, optimizer)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
    _as_process(monkeypatch, 0)
    ckpt.save(init(), iterators[0])
    # Orbax calls Grain's handler on every process, into the same step folder; process 1's call
    # is made here directly.
    data_dir = tmp_path / "checkpoints" / "0" / "data"
    _as_process(monkeypatch, 1)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(data_dir, args=grain.checkpoint.CheckpointSave(iterators[1]))
    names = {p.name for p in data_dir.iterdir() if p.name.startswith("process_")}
    assert names == {"process_0-of-2.json", "process_1-of-2.json"}
    abstract = sharding.abstract_like(jax.eval_shape(init), sharding.make_mesh())
    for process, position in ((0, 3), (1, 7)):
        _as_process(monkeypatch, process)
        fresh = iter(dataset)
        state = ckpt.restore(abstract, fresh)
        assert int(state.step) == 0
        assert next(fresh) == position
    ckpt.close()
