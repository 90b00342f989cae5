"""Data parallelism: a 1-D `data` mesh, replicated state, batches split over the devices."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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
