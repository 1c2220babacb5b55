"""Device mesh and shardings for data-parallel training.

One code path for 1..N devices and 1..M hosts: a 1-D mesh over all devices
named "data"; batches are sharded along it, the train state is replicated.
`jax.jit` then inserts the gradient all-reduce itself (JAX's successor to
pmap). Each host feeds only its own slice of the global batch.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitat_jax.errors import UserError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size"):
  """A batch the device count does not divide is an error, not a truncation."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise UserError(f"{what}={global_batch_size} is not divisible by the "
                    f"{devices} devices: use a multiple of {devices}")


def shard_batch(mesh: Mesh, local_arrays):
  """Assembles each host's local slice into a global array sharded on "data"."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
      local_arrays)


def replicate(mesh: Mesh, tree):
  """Places a pytree (e.g. the train state) on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
