"""What a run reports: the log line, metrics.jsonl, summary.json, and throughput."""

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from randygpt.errors import DISK_FULL, UserError, write_advice


class WriteFailed(UserError):
  """A run's file could not be written (`path`, the OSError `error`)."""

  def __init__(self, message: str, path: Path, error: OSError):
    super().__init__(message)
    self.path, self.error = path, error


def write_failed(path: Path, error: OSError, kept: str = "",
                 then: str = "resume with --resume") -> WriteFailed:
  """The error for a file of the run that could not be written: the path, the OS's reason,
  what is kept (`kept`, a sentence and a space, or empty) and what to do."""
  reason = error.strerror or str(error) or type(error).__name__
  return WriteFailed(f"Could not write {path} ({reason}). {kept}"
                     f"{write_advice(error.errno).capitalize()}, then {then}.", path, error)


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_rate(tokens_per_sec: float) -> str:
  return f"{tokens_per_sec / 1e3:.1f}k" if tokens_per_sec >= 1e3 else f"{tokens_per_sec:.0f}"


def phase(message: str) -> None:
  """A short line saying what the program is doing (tests wait for these). On a terminal
  it is overwritten by the next line."""
  print(message, end="\r" if sys.stdout.isatty() else "\n", flush=True)


def log_line(record: dict, best: tuple[float, int] | None, eta_s: float | None) -> str:
  """One human line per logged iteration, e.g. `iter  100 | loss 2.4512 | val 2.4601 ...`."""
  parts = [f"iter {record['iter']:4d}", f"loss {record['train_loss']:.4f}"]
  if "val_loss" in record:
    val = record["val_loss"]
    parts.append(f"val {val:.4f} (ppl {math.exp(min(val, 50.0)):.1f})")
    if "val_bpc" in record:
      parts.append(f"{record['val_bpc']:.4f} bpc")
  parts.append(f"lr {record['lr']:.1e}")
  if best is not None:
    parts.append(f"best {best[0]:.4f} @{best[1]}")
  if "ms_per_iter" in record:
    parts.append(f"{record['ms_per_iter']:.0f} ms/it")
    parts.append(f"{format_rate(record['tokens_per_sec'])} tok/s")
  if eta_s is not None:
    parts.append(f"ETA {format_duration(eta_s)}")
  return " | ".join(parts)


class Throughput:
  """Training speed between marks; time spent outside training steps is excluded by
  marking again after it."""

  def __init__(self, tokens_per_step: int, step: int):
    self.tokens_per_step = tokens_per_step
    self.mark(step)

  def mark(self, step: int) -> None:
    self._time, self._step = time.perf_counter(), step

  def since_mark(self, step: int) -> dict:
    if step <= self._step:
      return {}
    seconds_per_step = (time.perf_counter() - self._time) / (step - self._step)
    return {"ms_per_iter": 1e3 * seconds_per_step,
            "tokens_per_sec": self.tokens_per_step / seconds_per_step}


class MetricsFile:
  """`metrics.jsonl`: one JSON object per logged iteration, flushed as it is written.

  Opening it for a run that resumes at `start_iter` drops the records after that
  iteration, so the file reads as one continuous run.
  """

  def __init__(self, path: Path | None, start_iter: int):
    """With `path` None (processes other than 0) nothing is written."""
    self._file, self.path = None, path
    if path is not None:
      kept = [json.dumps(r) + "\n" for r in read_records(path) if r["iter"] <= start_iter]
      write_text(path, "".join(kept))
      try:
        self._file = open(path, "a", encoding="utf-8")
      except OSError as e:
        raise write_failed(path, e) from None

  def write(self, record: dict) -> None:
    if self._file:
      try:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
      except OSError as e:
        self.close()  # What stays in its buffer would fail again when it is collected.
        raise write_failed(self.path, e) from None

  def close(self) -> None:
    if self._file:
      file, self._file = self._file, None
      try:
        file.close()
      except OSError:  # Its last line, which write() has reported.
        pass


def read_records(path: Path) -> list[dict]:
  """The records of a metrics.jsonl; a line cut short by a killed run is skipped."""
  records = []
  if path.exists():
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and "iter" in record:  # Not some other program's lines.
        records.append(record)
  return records


def write_text(path: Path, text: str) -> None:
  """Write atomically and durably: a reader never sees half a file, and after a power cut
  the file holds the old text or the new one (synced before the rename that shows it)."""
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.unlink(missing_ok=True)  # A link left there is removed, not written through.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(path)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    if not (e.errno in DISK_FULL and _overwrite(path, text)):
      raise write_failed(path, e) from None


def _overwrite(path: Path, text: str) -> bool:
  """On a full disk, writes `text` over the file's own blocks (a summary is small): the
  file then says how the run ended, if not atomically. Whether it did."""
  data = text.encode("utf-8")
  try:
    if not path.is_file() or path.stat().st_blocks * 512 < len(data):  # Blocks it holds.
      return False
    with open(path, "r+b") as f:
      f.write(data)
      f.truncate()
      f.flush()
      os.fsync(f.fileno())
  except OSError:
    return False
  return True


def write_json(path: Path, obj: dict) -> None:
  write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
