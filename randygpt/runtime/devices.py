"""The process side of the devices: how many CPU devices XLA makes, joining a multi-process
run, and the processes agreeing with each other. (How arrays are laid out over the devices:
randygpt/sharding.py; how many devices a run takes: runtime/placement.py.)
"""

import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from randygpt.errors import UserError


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


def from_process_0(values: np.ndarray) -> np.ndarray:
  """Process 0's `values` on every process: measurements that must give every process the
  same choice."""
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.broadcast_one_to_all(values))
