"""Where the work runs: CPU devices for training, a 1-D `data` mesh and its shardings.

The global batch is split over the `data` axis; parameters and optimizer state are
replicated, and each device's gradient is averaged with the others' once a step
(`on_each_device`; the loss is a mean over the global batch). Random numbers are drawn for
the global shape (`jax_threefry_partitionable`) or per global row, so data windows and
dropout masks do not depend on the device count.
"""

import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from randygpt.errors import UserError


AUTO_MAX_DEVICES = 2  # Measured best on 2 cores (docs/measurements.md, "Data parallelism").


def cpu_device_count(requested: int, batch_size: int, num_processes: int = 1) -> int:
  """`requested`, or for 0 (auto) the largest count up to min(cores, 2) dividing the batch;
  one per process in a multi-process run."""
  if requested or num_processes > 1:
    return requested or 1
  top = min(os.cpu_count() or 1, AUTO_MAX_DEVICES)
  return max(n for n in range(1, top + 1) if batch_size % n == 0)


def why_device_count(requested: int, explicit: bool, num_processes: int, platform: str) -> str:
  """The header's reason for the training device count."""
  if platform != "cpu":
    return f"training on {platform}"
  if num_processes > 1:
    return "one per process"
  if explicit:
    return "--num_cpu_devices"
  if requested:
    return "kept from the run's flags.cfg"
  return f"automatic: up to min(cores, {AUTO_MAX_DEVICES}) dividing the batch"


def saved_device_count(workdir: str) -> int:
  """The --num_cpu_devices that `workdir`'s flags.cfg records (0 when none): a resume trains
  on the device count its run chose, fixed before JAX starts."""
  try:
    text = (Path(workdir) / "flags.cfg").read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError):
    return 0
  counts = [line.partition("=")[2].strip() for line in text.splitlines()
            if line.startswith("--num_cpu_devices=")]
  return int(counts[-1]) if counts and counts[-1].isdigit() else 0


def set_cpu_device_count(n: int) -> None:
  """Splits the host CPU into `n` XLA devices; must run before JAX starts its backends."""
  jax.config.update("jax_num_cpu_devices", n)
  jax.config.update("jax_threefry_partitionable", True)


def _wait_for_coordinator(address: str, process_id: int, timeout_s: int) -> None:
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return
    except (OSError, ValueError) as e:
      if time.monotonic() > deadline:
        raise UserError(
            f"Process {process_id} could not join the run at {address} within {timeout_s}s "
            f"({e}). Start every process with the same --coordinator_address and "
            "--num_processes; process 0 hosts the coordinator.") from None
      time.sleep(0.5)


def join_cluster(coordinator_address: str, num_processes: int, process_id: int,
                 timeout_s: int) -> None:
  """Joins a multi-process run through JAX's distributed runtime (before any computation)."""
  if not coordinator_address and num_processes == 1:
    return
  if process_id > 0 and coordinator_address != "auto":
    # JAX aborts the process (no exception) when the coordinator never answers: look first.
    _wait_for_coordinator(coordinator_address, process_id, timeout_s)
  try:
    if coordinator_address == "auto":
      jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=timeout_s,
                                 heartbeat_timeout_seconds=timeout_s)
  except Exception as e:  # The runtime raises several kinds for an unreachable peer.
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise UserError(f"Process {process_id} could not join the run at {coordinator_address} "
                    f"within {timeout_s}s ({reason}). Start every process with the same "
                    "--coordinator_address and --num_processes; process 0 hosts the "
                    "coordinator.") from None


def is_main_process() -> bool:
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process gets here (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any: processes agree where to stop."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def local_copy(tree):
  """Each array's replica on one of this process's devices (for work outside the mesh)."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


def data_mesh(devices) -> Mesh:
  return Mesh(np.array(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def on_each_device(fn, mesh: Mesh):
  """`fn(params, batch, rng, first_row)` run on each device's rows of the batch (the first of
  them is row `first_row` of the whole batch), its results averaged over the devices in one
  all-reduce. XLA's own partitioning of a step that sums microbatches all-reduced every
  microbatch's gradient: 9-11% slower (docs/measurements.md, "One all-reduce a step")."""
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


def check_batch_divides(batch_size: int, n_devices: int) -> None:
  if batch_size % n_devices:
    raise UserError(f"--batch_size={batch_size} does not divide evenly across {n_devices} "
                    f"devices; use a multiple of {n_devices} or another --num_cpu_devices.")
