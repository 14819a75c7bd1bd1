"""Starts one run as N local processes that train one model together:
`python -m randygpt.launch --processes=N [randygpt.main flags...]` (`launch.sh --processes=N`).

Each process is `python -m randygpt.main` with --coordinator_address (127.0.0.1 and a free
port), --num_processes and --process_id added. Ctrl-C and SIGTERM are passed on to every
process, which agree on the step to stop at and save together. When one process fails,
the others are killed at once (within POLL_S): they wait in a collective for the dead one,
and a save is a collective too, so none can save. The launcher then says, in one line, which
process died and which checkpoint is the last complete one, marks the run failed, and exits
with the failing status.
"""

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from randygpt.runtime.watch import LAUNCHED_ENV

POLL_S = 0.2  # How often the launcher looks at its processes.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(n_processes: int, args: list[str]) -> int:
  address = f"127.0.0.1:{free_port()}"
  env = {**os.environ, LAUNCHED_ENV: "1"}  # Deaths are the launcher's to report.
  processes = [
      subprocess.Popen([sys.executable, "-m", "randygpt.main", *args,
                        f"--coordinator_address={address}", f"--num_processes={n_processes}",
                        f"--process_id={rank}"], env=env)
      for rank in range(n_processes)]

  stopping = []  # The signals forwarded: the processes stop together, and save.

  def forward(signum, frame):
    stopping.append(signum)
    for p in processes:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)
  # What a death's report needs (JAX, Orbax), imported while the processes start: a
  # report seconds late would leave the user waiting on a run that is over.
  _workdir(args)
  importlib.import_module("randygpt.checkpoint")
  while True:
    codes = [p.poll() for p in processes]
    # A process killed by a signal first: the others' failures follow from it.
    failed = sorted(((rank, c) for rank, c in enumerate(codes) if c not in (None, 0)),
                    key=lambda failure: failure[1] >= 0)
    if failed and not stopping:
      for p in processes:
        if p.poll() is None:
          p.kill()  # Waiting in a collective for the dead one: nothing else ends it.
      for p in processes:
        p.wait()
      rank, code = failed[0]
      if code < 0:  # Killed: it said nothing itself.
        _report_death(rank, n_processes, signal.Signals(-code).name, args)
    if failed and not stopping or all(c is not None for c in codes):
      code = next((c for _, c in failed), 0)
      return 128 - code if code < 0 else code  # Killed by signal N: a shell's 128+N.
    time.sleep(POLL_S)


def _workdir(args: list[str]) -> Path:
  """The --workdir the processes were given (their flag files included)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  importlib.import_module("randygpt.flags")  # Defines the flags.
  try:
    flags.FLAGS(["randygpt.launch", *args], known_only=True)
  except flags.Error:
    pass
  return Path(flags.FLAGS["workdir"].value)


def _report_death(rank: int, n_processes: int, how: str, args: list[str]) -> None:
  """One line for a process killed mid-run: who, and where the run can resume from."""
  from randygpt import checkpoint  # pylint: disable=import-outside-toplevel
  from randygpt.runtime import rundir  # pylint: disable=import-outside-toplevel
  workdir = _workdir(args)
  newest = checkpoint.Checkpoints(workdir).newest()
  kept = (f"The last complete checkpoint is {newest}: resume with --resume."
          if newest else "Nothing was saved.")
  rundir.mark_ended(workdir, "failed")
  print(f"Error: Process {rank} of {n_processes} was killed ({how}); the others were stopped "
        f"(a save needs every process, so none was made). {kept}", file=sys.stderr,
        flush=True)


def main(argv: list[str]) -> int:
  counts = [a for a in argv if a.startswith("--processes=")]
  rest = [a for a in argv if not a.startswith("--processes=")]
  try:
    n_processes = int(counts[-1].split("=", 1)[1]) if counts else 1
  except ValueError:
    n_processes = 0
  if n_processes < 1:
    print(f"Error: --processes must be a positive integer, not {counts[-1]!r}.",
          file=sys.stderr)
    return 2
  return launch(n_processes, rest)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
