"""The table of tools/device-check-gpu.sh: nanoGPT's and randygpt's runs side by side, read
from the logs, summary and metrics it wrote to OUT.   python tools/gpu_table.py OUT"""

import json
import re
import statistics
import sys
from pathlib import Path


def _status(log: str) -> tuple[str, float | None]:
  match = re.search(r"^status (\d+) wall_s ([\d.]+)", log, re.M)
  return (match.group(1), float(match.group(2))) if match else ("?", None)


def nanogpt(out: Path) -> dict | None:
  path = out / "nanogpt.log"
  if not path.exists():
    return None
  log = path.read_text(errors="replace")
  iters = [(int(i), float(ms))
           for i, ms in re.findall(r"^iter (\d+): .*time ([\d.]+)ms", log, re.M)]
  vals = [float(v)
          for v in re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", log, re.M)]
  peak = re.search(r"^peak_gpu_bytes (\d+)", log, re.M)
  status, wall = _status(log)
  interval = re.search(r"^Overriding: eval_interval = (\d+)", log, re.M)
  interval = int(interval.group(1)) if interval else 250
  plain = [ms for i, ms in iters if i > 0 and i % interval]
  with_eval = [ms for i, ms in iters if i > 0 and not i % interval]
  ms = statistics.median(plain) if plain else None
  return {"status": status, "wall_s": wall, "ms_per_iter": ms,
          # An iteration that evaluates takes its estimate's time too (nanoGPT logs no other).
          "eval_s": (statistics.median(with_eval) - ms) / 1e3 if with_eval and ms else None,
          "first_iter_s": iters[0][1] / 1e3 if iters else None,
          "best_val": min(vals) if vals else None, "last_iter": iters[-1][0] if iters else None,
          "peak_gpu_mb": int(peak.group(1)) / 2**20 if peak else None}


def randygpt(out: Path) -> dict | None:
  path = out / "randygpt.log"
  if not path.exists():
    return None
  status, wall = _status(path.read_text(errors="replace"))
  summary, records = {}, []
  if (out / "summary.json").exists():
    summary = json.loads((out / "summary.json").read_text())
  if (out / "metrics.jsonl").exists():
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  ms = [r["ms_per_iter"] for r in records if "ms_per_iter" in r]
  evals = [r["eval_s"] for r in records if "eval_s" in r][1:]  # Not the first: it compiles.
  return {"status": status, "wall_s": wall, "ms_per_iter": statistics.median(ms) if ms else None,
          "eval_s": statistics.median(evals) if evals else None,
          "first_iter_s": summary.get("startup_s"), "compile_s": summary.get("compile_s"),
          "best_val": summary.get("best_val_loss"), "last_iter": summary.get("iters"),
          "final_val_full": summary.get("final_val_full"),
          "peak_gpu_mb": (summary.get("memory_mb") or {}).get("device_peak")}


def _cell(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def main(out: Path) -> None:
  rows = [("nanoGPT train.py, torch.compile", nanogpt(out)),
          ("randygpt shakespeare_char.cfg", randygpt(out))]
  print("| run | exit | iterations | ms/iter (median) | evaluation s (median) | first iteration "
        "s (compile incl.) | train-step compile s | wall s | best val | peak GPU MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, row in rows:
    if row is None:
      continue
    print(f"| {name} | {row['status']} | {_cell(row['last_iter'], 'd')} | "
          f"{_cell(row['ms_per_iter'], '.2f')} | {_cell(row['eval_s'], '.2f')} | "
          f"{_cell(row['first_iter_s'], '.1f')} | "
          f"{_cell(row.get('compile_s'), '.1f')} | {_cell(row['wall_s'], '.1f')} | "
          f"{_cell(row['best_val'], '.4f')} | {_cell(row['peak_gpu_mb'], '.0f')} |")
  peer, ours = rows[0][1], rows[1][1]
  if peer and ours and peer["wall_s"] and ours["wall_s"] and peer["best_val"] and ours["best_val"]:
    print(f"\nrandygpt / nanoGPT wall time {ours['wall_s'] / peer['wall_s']:.2f}; best val "
          f"{ours['best_val'] - peer['best_val']:+.4f}")


if __name__ == "__main__":
  main(Path(sys.argv[1]))
