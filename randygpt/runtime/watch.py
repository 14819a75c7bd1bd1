"""Ending a multi-process run started by hand or by SLURM at once when one of its processes
dies, with one line, rather than when JAX's heartbeat gives up (--distributed_timeout) with
its fatal log. (Under randygpt.launch the launcher does this itself: LAUNCHED_ENV.)

Every process keeps a TCP connection to process 0 (its port, and a secret that proves a
peer, published through JAX's key-value store), held by a small helper process of its own
(`python -m randygpt.runtime.watch`): a training process can wait in native code holding
Python's lock, where no thread of its own could act. A process that ends its work tells its
helper, which says "done" to the peers; a process that dies closes the pipe to its helper,
which closes its connections. A connection that closes without "done" means a dead
process: the helper of each survivor kills its process (it waits for the dead one in a
collective, and a save is one too, so none can save), prints one line naming the last
complete checkpoint, and process 0's marks the run failed. A machine that stops without
closing its connections is left to JAX's heartbeat.
"""

import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
from pathlib import Path

LAUNCHED_ENV = "RANDYGPT_LAUNCHED"
_KEY = "randygpt/watch"
_DONE, _DIED, _FAILED = b"d", b"x", b"e"  # "done"; "<rank> died" (2 bytes); "failed".
_HELPER = {}


def start(workdir: str, rank: int, n_processes: int, timeout_s: int) -> None:
  """Starts watching the other processes (a multi-process run outside the launcher)."""
  if n_processes == 1 or os.environ.get(LAUNCHED_ENV):
    return
  peers = []
  try:
    peers = _connect(rank, n_processes, timeout_s)
    package = str(Path(__file__).resolve().parents[2])
    _HELPER["process"] = subprocess.Popen(
        [sys.executable, "-m", "randygpt.runtime.watch", workdir, str(rank), str(n_processes),
         str(os.getpid()), *(f"{peer.fileno()}:{r}" for peer, r in peers)],
        stdin=subprocess.PIPE, pass_fds=[peer.fileno() for peer, _ in peers],
        start_new_session=True,  # Ctrl-C in the terminal is the run's, not the helper's.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, (package, os.environ.get("PYTHONPATH"))))})
  except Exception:  # pylint: disable=broad-except  # E.g. a firewall: the heartbeat remains.
    pass
  for peer, _ in peers:
    peer.close()  # The helper holds them.


def _connect(rank: int, n_processes: int, timeout_s: int) -> list:
  """Process 0 accepts a connection from each other process, which proves itself with a
  secret published through JAX's key-value store (others who reach the port cannot end the
  run). The connections and their peers' ranks."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  state = distributed.global_state
  if rank > 0:
    port, _, secret = state.client.blocking_key_value_get(_KEY, timeout_s * 1000).partition(":")
    host = state.coordinator_address.rpartition(":")[0].strip("[]")
    peer = socket.create_connection((host, int(port)), timeout=timeout_s)
    peer.sendall(bytes.fromhex(secret) + rank.to_bytes(2, "big"))
    return [(peer, 0)]
  secret, peers = secrets.token_bytes(16), []
  dual = socket.has_dualstack_ipv6()  # IPv4 and IPv6 peers alike, where it can.
  with socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET,
                            dualstack_ipv6=dual) as server:
    server.settimeout(timeout_s)
    state.client.key_value_set(_KEY, f"{server.getsockname()[1]}:{secret.hex()}")
    while len(peers) < n_processes - 1:
      peer, _ = server.accept()
      peer.settimeout(timeout_s)
      hello = b""
      while len(hello) < len(secret) + 2 and (chunk := peer.recv(len(secret) + 2 - len(hello))):
        hello += chunk
      if hello[:len(secret)] == secret:
        peers.append((peer, int.from_bytes(hello[len(secret):], "big")))
      else:
        peer.close()
  return peers


def finished(completed: bool) -> None:
  """This process is ending: `completed` its work (done, or stopped by a signal with the
  others), so its peers take its end as no death; else (its own error, which it reports)
  they are ended too, and its helper says nothing."""
  if (helper := _HELPER.pop("process", None)):
    try:
      helper.stdin.write(_DONE if completed else _FAILED)
      helper.stdin.close()
      helper.wait()
    except OSError:
      pass


def _report(dead: int, rank: int, n_processes: int, parent: int, workdir: str, peers) -> None:
  """Process `dead` died: kills this helper's process, tells the others, says it once."""
  os.kill(parent, signal.SIGKILL)  # First: JAX's own fatal log cannot follow.
  for peer in peers:  # From process 0: who died.
    try:
      peer.sendall(_DIED + dead.to_bytes(2, "big"))
    except OSError:
      pass
  from randygpt import checkpoint  # pylint: disable=import-outside-toplevel
  from randygpt.runtime import rundir  # pylint: disable=import-outside-toplevel
  newest = checkpoint.Checkpoints(Path(workdir)).newest()
  kept = (f"The last complete checkpoint is {newest}: resume with --resume."
          if newest else "Nothing was saved.")
  if rank == 0:  # It writes the run's files.
    rundir.mark_ended(Path(workdir), "failed")
  line = (f"Error: Process {dead} of {n_processes} ended without finishing the run; this "
          f"process stops too (a save needs every process, so none was made). {kept}")
  os.write(2, f"{line}\n".encode())


def _watch(workdir: str, rank: int, n_processes: int, parent: int, peers: dict) -> None:
  """The helper: waits for its process's word (or its death: the pipe closes) and for its
  peers' (a connection closed without "done": a death)."""
  selector = selectors.DefaultSelector()
  selector.register(sys.stdin.buffer, selectors.EVENT_READ)
  for peer in peers:
    selector.register(peer, selectors.EVENT_READ)
  while True:
    for key, _ in selector.select():
      if key.fileobj is sys.stdin.buffer:
        if os.read(0, 1) == _DONE:
          for peer in peers:
            try:
              peer.sendall(_DONE)
            except OSError:
              pass
        return  # Done, failed (it says why) or dead: closing the connections tells the peers.
      seen = _recv(key.fileobj)
      if seen.startswith(_DONE):
        selector.unregister(key.fileobj)  # It finished: its end is no death.
        continue
      dead = int.from_bytes(seen[1:3], "big") if seen[:1] == _DIED else peers[key.fileobj]
      _report(dead, rank, n_processes, parent, workdir, [p for p in peers if p is not key.fileobj])
      sys.exit(1)


def _recv(peer: socket.socket) -> bytes:
  try:
    return peer.recv(16)
  except OSError:
    return b""


if __name__ == "__main__":
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _workdir, _rank, _n, _parent, *_peers = sys.argv[1:]
  _watch(_workdir, int(_rank), int(_n), int(_parent),
         {socket.socket(fileno=int(fd)): int(r)
          for fd, r in (p.split(":") for p in _peers)})
