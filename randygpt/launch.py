"""Starts one run as N local processes that train one model together:
`python -m randygpt.launch --processes=N [randygpt.main flags...]` (`launch.sh --processes=N`).

Each process is `python -m randygpt.main` with --coordinator_address (127.0.0.1 and a free
port), --num_processes and --process_id added. Ctrl-C and SIGTERM are passed on to every
process, which agree on the step to stop at and save together. When one process fails,
the others are stopped and the launcher exits with the failing status.
"""

import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(n_processes: int, args: list[str]) -> int:
  address = f"127.0.0.1:{free_port()}"
  processes = [
      subprocess.Popen([sys.executable, "-m", "randygpt.main", *args,
                        f"--coordinator_address={address}", f"--num_processes={n_processes}",
                        f"--process_id={rank}"])
      for rank in range(n_processes)]

  def forward(signum, frame):
    for p in processes:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)
  while True:
    codes = [p.poll() for p in processes]
    failed = [c for c in codes if c not in (None, 0)]
    if failed:
      for p in processes:
        if p.poll() is None:
          p.terminate()
      for p in processes:
        p.wait()
      code = failed[0]
      return 128 - code if code < 0 else code  # Killed by signal N: a shell's 128+N.
    if all(c == 0 for c in codes):
      return 0
    time.sleep(0.2)


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
