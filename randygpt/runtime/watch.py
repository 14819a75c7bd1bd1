"""Ending a multi-process run started by hand or by SLURM at once when one of its processes
dies, with one line, rather than when JAX's heartbeat gives up (--distributed_timeout) with
its fatal log. (Under randygpt.launch the launcher does this itself: LAUNCHED_ENV.)

Every process keeps a TCP connection to process 0 (its port, and a secret that proves a
peer, published through JAX's key-value store). A process that finishes its work says "done" on it first; a connection
that closes without it belongs to a process that died (killed, crashed, its machine's
network gone), and the kernel closes it the moment a process dies. Process 0 then tells the
others which process died; each prints one line naming the last complete checkpoint and
exits: the survivors were waiting for the dead one in a collective, and a save is one too,
so none can save. A machine that stops without closing its connections is left to JAX's
heartbeat.
"""

import os
import secrets
import socket
import sys
import threading
from pathlib import Path

LAUNCHED_ENV = "RANDYGPT_LAUNCHED"
_KEY = "randygpt/watch"
_DONE, _DIED = b"d", b"x"  # "done"; "process <rank> died" (its rank in the next 2 bytes).
_STATE = {"peers": [], "ending": False}
_ONE_REPORT = threading.Lock()  # Two peers may die at once: one line.


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state


def start(workdir: str, rank: int, n_processes: int, timeout_s: int) -> None:
  """Starts watching the other processes (a multi-process run outside the launcher)."""
  if n_processes == 1 or os.environ.get(LAUNCHED_ENV):
    return
  try:
    _connect(workdir, rank, n_processes, timeout_s)
  except Exception:  # pylint: disable=broad-except  # E.g. a firewall: the heartbeat remains.
    for peer in _STATE["peers"]:
      peer.close()
    _STATE["peers"].clear()


def _connect(workdir: str, rank: int, n_processes: int, timeout_s: int) -> None:
  """Process 0 accepts a connection from each other process, which proves itself with a
  secret published through JAX's key-value store (others who reach the port cannot end the
  run); each watches its connections."""
  state = _client()
  if rank == 0:
    secret = secrets.token_bytes(16)
    server = socket.create_server(("", 0))
    server.settimeout(timeout_s)
    state.client.key_value_set(_KEY, f"{server.getsockname()[1]}:{secret.hex()}")
    while len(_STATE["peers"]) < n_processes - 1:
      peer, _ = server.accept()
      hello = _read(peer, len(secret) + 2, timeout_s)
      if hello[:len(secret)] != secret:
        peer.close()
        continue
      _STATE["peers"].append(peer)
      peer_rank = int.from_bytes(hello[len(secret):], "big")
      _thread(peer, lambda seen, r=peer_rank: _peer_ended(r, 0, workdir, n_processes))
    server.close()
    return
  port, _, secret = state.client.blocking_key_value_get(_KEY, timeout_s * 1000).partition(":")
  host = state.coordinator_address.rpartition(":")[0].strip("[]")
  peer = socket.create_connection((host, int(port)), timeout=timeout_s)
  peer.settimeout(None)
  peer.sendall(bytes.fromhex(secret) + rank.to_bytes(2, "big"))
  _STATE["peers"].append(peer)
  _thread(peer, lambda seen: _peer_ended(
      int.from_bytes(seen[1:3], "big") if seen[:1] == _DIED else 0, rank, workdir, n_processes))


def _read(peer: socket.socket, n: int, timeout_s: int) -> bytes:
  peer.settimeout(timeout_s)
  data = b""
  while len(data) < n and (chunk := peer.recv(n - len(data))):
    data += chunk
  peer.settimeout(None)
  return data


def _thread(peer: socket.socket, on_end) -> None:
  def watch():
    seen = b""
    while (chunk := _recv(peer)):
      seen += chunk
    if not seen.startswith(_DONE):
      on_end(seen)
  threading.Thread(target=watch, daemon=True, name="randygpt-watch").start()


def _recv(peer: socket.socket) -> bytes:
  try:
    return peer.recv(16)
  except OSError:
    return b""


def finished(completed: bool) -> None:
  """This process is ending: `completed` its work (done, or stopped by a signal with the
  others), so its peers take its connection closing as no death; else (its own error, which
  it reports) they are ended too, and its own watch says nothing more."""
  _STATE["ending"] = True
  for peer in _STATE["peers"] if completed else ():
    try:
      peer.sendall(_DONE)
    except OSError:
      pass


def _peer_ended(dead: int, rank: int, workdir: str, n_processes: int) -> None:
  """Process `dead` died (this is process `rank`): ends this one, with one line."""
  if _STATE["ending"] or not _ONE_REPORT.acquire(blocking=False):
    return
  from randygpt import checkpoint  # pylint: disable=import-outside-toplevel
  from randygpt.runtime import rundir  # pylint: disable=import-outside-toplevel
  for peer in _STATE["peers"]:  # Process 0 tells the others who died.
    try:
      peer.sendall(_DIED + dead.to_bytes(2, "big"))
    except OSError:
      pass
  newest = checkpoint.Checkpoints(Path(workdir)).newest()
  kept = (f"The last complete checkpoint is {newest}: resume with --resume."
          if newest else "Nothing was saved.")
  if rank == 0:  # It writes the run's files.
    rundir.mark_ended(Path(workdir), "failed")
  print(f"Error: Process {dead} of {n_processes} ended without finishing the run; this "
        f"process stops too (a save needs every process, so none was made). {kept}",
        file=sys.__stderr__, flush=True)
  os._exit(1)
