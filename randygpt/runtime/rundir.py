"""A run's workdir beyond its metrics: the lock that keeps it to one run at a time, run.json
(what code and libraries ran it), and the commands that continue from it.

The lock is `fcntl.flock` on `<workdir>/run.lock`: the kernel drops it when the process
ends however it ends, so a killed run never leaves a stale lock behind.
"""

import contextlib
import datetime
import errno
import fcntl
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from randygpt import metrics
from randygpt.errors import UserError

LOCK_NAME = "run.lock"
PACKAGES = ("jax", "jaxlib", "optax", "orbax-checkpoint")
CODE_DIR = Path(__file__).resolve().parent


def _try_lock(file) -> bool:
  try:
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False


def _open_lock(workdir: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
  """The lock file's descriptor, never opened through a symbolic link (one left there by
  someone else could make the run write where it points)."""
  path = workdir / LOCK_NAME
  try:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UserError(f"{path} is a symbolic link, which a run never makes: remove it "
                      "(rm it), then run again.") from None
    raise


@contextlib.contextmanager
def claim(workdir: Path, lock: bool = True):
  """Creates `workdir` and holds it (with `lock`) for one run; refuses one that a live run
  holds. In a multi-process run only process 0 locks: the others share its workdir."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir={workdir} is a file, not a directory.")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if not os.access(workdir, os.W_OK | os.X_OK):  # Its files may still be writable.
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
  except OSError as e:
    raise UserError(f"Cannot write to --workdir={workdir} ({e.strerror}). Choose a writable "
                    "--workdir.") from None
  if not lock:
    yield
    return
  with open(_open_lock(workdir), "r+", encoding="utf-8") as file:
    if not _try_lock(file):
      holder = file.read().strip() or "unknown"
      raise UserError(f"--workdir={workdir} is in use by another run (process {holder}). "
                      "Wait for it to end, or choose another --workdir.")
    file.truncate(0)
    file.write(f"{os.getpid()}\n")  # Named in the refusal of a second run.
    file.flush()
    if mark_ended(workdir, "killed"):  # Nothing holds it, yet a run says it is running.
      print(f"⚠ The last run in {workdir} ended without a word (killed, or the machine "
            "stopped): its summary.json now says killed.", flush=True)
    yield


def mark_ended(workdir: Path, status: str) -> bool:
  """Gives a summary.json that says `running` the status `status`; whether it did. A run
  that could not write its end (SIGKILL, a power cut) left it so."""
  path = workdir / "summary.json"
  try:
    summary = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  if not isinstance(summary, dict) or summary.get("status") != "running":
    return False
  metrics.write_json(path, summary | {"status": status})
  return True


def is_held(workdir: Path) -> bool:
  """Whether a live process holds `workdir` (a run in progress)."""
  try:
    fd = _open_lock(workdir, os.O_RDONLY)
  except (OSError, UserError):  # None, or not a lock a run made.
    return False
  with open(fd, "rb") as file:
    return not _try_lock(file)  # Closing the file releases a lock taken here.


def _git(*args: str) -> str | None:
  try:
    result = subprocess.run(["git", "-C", str(CODE_DIR), *args], capture_output=True,
                            text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.strip() if result.returncode == 0 else None


def code_version() -> dict:
  """The git commit of randygpt's code and whether the tree had changes; "unknown" without
  git or outside a repository."""
  commit = _git("rev-parse", "HEAD")
  status = _git("status", "--porcelain") if commit else None
  return {"commit": commit or "unknown",
          "dirty": "unknown" if status is None else bool(status)}


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def environment() -> dict:
  """What ran a run: the command, Python, the libraries and the code's commit."""
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  program = ["-m", spec.name] if spec else sys.argv[:1]
  return {"command": shlex.join([sys.executable, *program, *sys.argv[1:]]),
          "cwd": os.getcwd(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "host": platform.node(),
          "python": platform.python_version(),
          "packages": {p: _version(p) for p in PACKAGES},
          "git": code_version()}


def record_start(workdir: Path, start_iter: int, new_history: bool, **details) -> None:
  """Adds this start to run.json's `starts` (with `details`, e.g. the data it read);
  `new_history` begins the list."""
  path = workdir / "run.json"
  starts = []
  if not new_history and path.is_file():
    starts = json.loads(path.read_text(encoding="utf-8")).get("starts", [])
  start = {"iter": start_iter, **environment(), **details}
  metrics.write_json(path, {"starts": [*starts, start]})


def update_start(workdir: Path, **fields) -> None:
  """Adds `fields` to run.json's entry for this start (the last)."""
  path = workdir / "run.json"
  record = json.loads(path.read_text(encoding="utf-8"))
  record["starts"][-1].update(fields)
  metrics.write_json(path, record)


def initialise(workdir: Path, config, tokenizer, start_iter: int, discard=(),
               new_history: bool | None = None, note: str | None = None, **details) -> None:
  """Readies `workdir` for a run starting at `start_iter`: deletes the checkpoints it
  discards, writes vocab.json, flags.cfg (`note` a comment atop it, else the notes it had
  when the history goes on), run.json (this start and its `details`) and a `running`
  summary.json. A new history (by default, a start at iteration 0) empties metrics.jsonl
  and begins run.json."""
  try:
    _initialise(workdir, config, tokenizer, start_iter, discard, new_history, note, **details)
  except OSError as e:  # What metrics.write_text does not report itself: vocab.json, run.json.
    raise metrics.write_failed(Path(e.filename or workdir), e, then="run it again") from None


def _initialise(workdir: Path, config, tokenizer, start_iter: int, discard,
                new_history: bool | None, note: str | None, **details) -> None:
  new_history = start_iter == 0 if new_history is None else new_history
  for path in discard:
    shutil.rmtree(path)
  tokenizer.save(workdir / "vocab.json")
  write_flags(workdir, config, note, keep_notes=not new_history)
  if new_history:
    metrics.write_text(workdir / "metrics.jsonl", "")
  record_start(workdir, start_iter, new_history, **details)
  metrics.write_json(workdir / "summary.json", {"status": "running", "iters": start_iter})


def write_flags(workdir: Path, config, note: str | None, keep_notes: bool = False) -> None:
  """flags.cfg: `config`'s flags, `note` a comment atop them (else, with `keep_notes`, the
  comments it had)."""
  notes = [f"# {note}"] if note else _notes(workdir / "flags.cfg") if keep_notes else []
  metrics.write_text(workdir / "flags.cfg", "".join(f"{n}\n" for n in notes)
                     + config.flagfile())


def _notes(path: Path) -> list[str]:
  """The comment lines of a flags.cfg (none when it is unreadable)."""
  try:
    return [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")]
  except (OSError, UnicodeDecodeError):
    return []


def next_steps(workdir: Path, status: str, iters: int) -> list[str]:
  """The commands that continue the run in `workdir` or sample from it."""
  lines = []
  if status != "completed":
    lines.append(f"Resume: python -m randygpt.main --resume --workdir={workdir} "
                 f"--iters={iters}")
  lines.append(f"Sample: python -m randygpt.sample --workdir={workdir}")
  return lines
