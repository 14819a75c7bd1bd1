"""What a run reports: the log line, metrics.jsonl and summary.json."""

import json
import math
from pathlib import Path


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_rate(tokens_per_sec: float) -> str:
  return f"{tokens_per_sec / 1e3:.1f}k" if tokens_per_sec >= 1e3 else f"{tokens_per_sec:.0f}"


def log_line(record: dict, best: tuple[float, int] | None, eta_s: float | None) -> str:
  """One human line per logged iteration, e.g. `iter  100 | loss 2.4512 | val 2.4601 ...`."""
  parts = [f"iter {record['iter']:4d}", f"loss {record['train_loss']:.4f}"]
  if "val_loss" in record:
    val = record["val_loss"]
    parts.append(f"val {val:.4f} (ppl {math.exp(min(val, 50.0)):.1f})")
  parts.append(f"lr {record['lr']:.1e}")
  if best is not None:
    parts.append(f"best {best[0]:.4f} @{best[1]}")
  if "ms_per_iter" in record:
    parts.append(f"{record['ms_per_iter']:.0f} ms/it")
    parts.append(f"{format_rate(record['tokens_per_sec'])} tok/s")
  if eta_s is not None:
    parts.append(f"ETA {format_duration(eta_s)}")
  return " | ".join(parts)


class MetricsFile:
  """`metrics.jsonl`: one JSON object per logged iteration, flushed as it is written."""

  def __init__(self, path: Path):
    self._file = open(path, "w", encoding="utf-8")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def write_json(path: Path, obj: dict) -> None:
  """Write atomically, so a reader never sees half a file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  tmp.replace(path)
