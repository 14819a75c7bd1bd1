"""How arrays and the train step are laid out over the training devices: a 1-D `data` mesh,
the batch split along it, parameters and optimizer state replicated.

The global batch is split over the `data` axis; each device's gradient is averaged with the
others' once a step (`on_each_device`; the loss is a mean over the global batch). Random
numbers are drawn for the global shape (`jax_threefry_partitionable`) or per global row, so
data windows and dropout masks do not depend on the device count.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(devices) -> Mesh:
  return Mesh(np.array(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def local_copy(tree):
  """Each array's replica on one of this process's devices (for work outside the mesh)."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


def on_each_device(fn, mesh: Mesh):
  """`fn(params, batch, rng, first_row)` run on each device's rows of the batch (the first of
  them is row `first_row` of the whole batch), its results averaged over the devices in one
  all-reduce. XLA's own partitioning of a step that sums microbatches all-reduced every
  microbatch's gradient: 9-11% slower (docs/measurements.md, "One all-reduce a step").
  On one device there is nothing to average: `fn` on the whole batch, with no shard_map and
  no collective, which a one-device plugin (jax-mps) lacks; the same numbers, bit for bit."""
  if mesh.size == 1:
    return lambda params, batch, rng: fn(params, batch, rng, 0)
  return shard_mapped(fn, mesh)


def shard_mapped(fn, mesh: Mesh):
  """`on_each_device` through shard_map and pmean, whatever the device count."""
  def local(params, batch, rng):
    first_row = jax.lax.axis_index("data") * jax.tree.leaves(batch)[0].shape[0]
    return jax.lax.pmean(fn(params, batch, rng, first_row), "data")
  specs = dict(mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data"), PartitionSpec()),
               out_specs=PartitionSpec())
  # The gradient is reduced by hand above, so JAX's replication checks stay off (they would
  # reduce it inside each microbatch's backward pass).
  if hasattr(jax, "shard_map"):
    return jax.shard_map(local, check_vma=False, **specs)
  from jax.experimental.shard_map import shard_map  # jax 0.5, the Metal stack.
  return shard_map(local, check_rep=False, **specs)
