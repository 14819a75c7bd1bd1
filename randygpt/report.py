"""Compare runs: `python -m randygpt.report RUN_DIR... [--sort=COLUMN] [--csv] [--plot=PNG]`.

A run is a workdir holding flags.cfg or run.lock; any other folder is searched for runs (a
sweep's parent folder). One row per run: its status, the flags that differ between the
runs, and its results from metrics.jsonl, so runs in progress and crashed runs have rows too.
"""

import csv
import dataclasses
import json
import os
import re
import statistics
import sys
from pathlib import Path

from absl import app
from absl import flags

from randygpt import metrics
from randygpt.runtime import cli, rundir
from randygpt.errors import UserError

flags.DEFINE_string("sort", "name", "Column to sort the rows by; a leading - sorts "
                    "descending, e.g. --sort=best_val or --sort=-tokens_per_sec.")
flags.DEFINE_bool("csv", False, "Print CSV (raw numbers) instead of a table.")
flags.DEFINE_string("plot", "", "Also draw train and val loss against iteration and against "
                    "wall time into this image file, e.g. curves.png (needs matplotlib).")
flags.DEFINE_bool("plot_wall_time", True, "With --plot: also the panel by wall time (leave it "
                  "out, --noplot_wall_time, when the runs shared a busy machine).")

# `iter`: the last logged iteration (the --iters flag, when it differs, is the target).
# `best_bpc`: the best evaluation's validation bits per character, comparable across tokenizers.
# `full_val`: summary.json's final_val_full, the last val loss over the whole val split.
RESULTS = ("iter", "best_val", "best_bpc", "best_iter", "final_val", "full_val",
           "tokens_per_sec", "wall")
MARKERS = ("flags.cfg", rundir.LOCK_NAME)  # What every run's workdir holds.


@dataclasses.dataclass
class Run:
  path: Path
  name: str
  status: str
  flags: dict[str, str]
  records: list[dict]  # metrics.jsonl.
  starts: list[int]  # The iterations it started or resumed at (run.json).
  full_val: float | None = None  # summary.json's final_val_full.


def _read_json(path: Path) -> dict | None:
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):  # UnicodeDecodeError is a ValueError.
    return None
  return content if isinstance(content, dict) else None


def _is_run(path: Path) -> bool:
  return any((path / marker).is_file() for marker in MARKERS)


def find_runs(paths: list[str]) -> list[Path]:
  """The workdirs named, and those inside the folders named, in order, each once."""
  found = []
  for path in map(Path, paths):
    if not path.exists():
      raise UserError(f"{path} does not exist.")
    if _is_run(path):
      found.append(path)
    elif path.is_dir():
      inside = sorted({p.parent for marker in MARKERS for p in path.rglob(marker)})
      if not inside:
        raise UserError(f"{path} holds no runs (a run's workdir holds flags.cfg).")
      found.extend(inside)
    else:
      raise UserError(f"{path} is not a run's workdir or a folder of runs.")
  return list(dict.fromkeys(p.resolve() for p in found))


def read_flags(workdir: Path) -> dict[str, str]:
  """flags.cfg as {name: value}; a repeated flag (--prompt) joins its values with commas."""
  values = {}
  path = workdir / "flags.cfg"
  lines = (path.read_text(encoding="utf-8", errors="replace").splitlines()
           if path.is_file() else [])
  for line in lines:
    if line.startswith("--"):
      name, _, value = line[2:].partition("=")
      values[name] = f"{values[name]},{value}" if name in values else value
  return values


def status(workdir: Path, has_records: bool) -> str:
  """`running` while a process holds the workdir; else summary.json's status, where
  `running` left behind (or metrics without a summary) means the run was killed."""
  if rundir.is_held(workdir):
    return "running"
  summary = _read_json(workdir / "summary.json")
  if summary and summary.get("status", "running") != "running":
    return summary["status"]
  return "crashed" if summary or has_records else "not started"


def load(workdir: Path, name: str) -> Run:
  records = metrics.read_records(workdir / "metrics.jsonl")
  starts = [s["iter"] for s in (_read_json(workdir / "run.json") or {}).get("starts", [])]
  full_val = (_read_json(workdir / "summary.json") or {}).get("final_val_full")
  return Run(workdir, name, status(workdir, bool(records)), read_flags(workdir), records,
             starts or [0], full_val)


def wall_times(run: Run) -> list[float]:
  """Seconds of training up to each record, summed over resumes (each restarts the clock)."""
  times, offset, segment, previous = [], 0.0, 1, 0.0
  for record in run.records:
    starts_before = sum(record["iter"] > s for s in run.starts)
    if starts_before != segment:
      offset, segment = offset + previous, starts_before
    previous = record["wall_s"]
    times.append(offset + previous)
  return times


def results(run: Run) -> dict:
  evals = [r for r in run.records if "val_loss" in r]
  best = min(evals, key=lambda r: r["val_loss"], default={})
  rates = [r["tokens_per_sec"] for r in run.records if "tokens_per_sec" in r]
  walls = wall_times(run)
  return {"iter": run.records[-1]["iter"] if run.records else None,
          "best_val": best.get("val_loss"), "best_bpc": best.get("val_bpc"),
          "best_iter": best.get("iter"),
          "final_val": evals[-1]["val_loss"] if evals else None, "full_val": run.full_val,
          "tokens_per_sec": statistics.median(rates) if rates else None,
          "wall": walls[-1] if walls else None}


def varying_flags(runs: list[Run]) -> list[str]:
  """The flags whose values are not the same in every run, in flags.cfg order."""
  names = dict.fromkeys(name for run in runs for name in run.flags)
  return [n for n in names if len({run.flags.get(n) for run in runs}) > 1]


def _sort_key(value):
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = None
  return (number is None, number or 0.0, str(value))


def rows(runs: list[Run], sort: str) -> tuple[list[str], list[dict]]:
  """The table's columns and rows, sorted by `sort` (a column, `-` first for descending)."""
  shown = varying_flags(runs)
  columns = ["name", "status", *shown, *RESULTS]
  table = [{"name": run.name, "status": run.status,
            **{name: run.flags.get(name) for name in shown}, **results(run)} for run in runs]
  column = sort.removeprefix("-")
  if column not in columns:
    raise UserError(f"--sort={sort}: no such column; choose one of {', '.join(columns)}.")
  present = [row for row in table if row[column] is not None]
  present.sort(key=lambda row: _sort_key(row[column]), reverse=sort.startswith("-"))
  return columns, present + [row for row in table if row[column] is None]


def _cell(column: str, value) -> str:
  if value is None:
    return "-"
  if column in ("best_val", "best_bpc", "final_val", "full_val"):
    return f"{value:.4f}"
  if column == "tokens_per_sec":
    return metrics.format_rate(value)
  if column == "wall":
    return metrics.format_duration(value)
  return str(value)


def format_table(columns: list[str], table: list[dict]) -> str:
  cells = [columns] + [[_cell(c, row[c]) for c in columns] for row in table]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                   for line in cells)


MAX_LABEL = 60  # Characters of a legend entry; presets that differ in many flags get names.


def compared(runs: list[Run]) -> list[str]:
  """Each run's label by what is compared: the flags that differ between the runs other than
  the seed and the workdir, so runs that differ only in their seed share a label (and a
  colour); the run's name where nothing else differs, or where that is too long to read
  (then the name that its seeds' runs share)."""
  names = [n for n in varying_flags(runs) if n not in ("seed", "workdir")]
  labels = [", ".join(n if run.flags[n] == "" else f"{n}={run.flags[n]}"
                      for n in names if n in run.flags) for run in runs]
  shared = _shared_names(runs, labels)
  return [label if 0 < len(label) <= MAX_LABEL else shared.get(label) or run.name
          for label, run in zip(labels, runs)]


def _shared_names(runs: list[Run], labels: list[str]) -> dict[str, str]:
  """For each label too long to read, the start its runs' names share less a trailing seed
  mark (shakespeare-s1, shakespeare-s2 -> shakespeare), where that names no other setting
  or run: two settings never share a colour."""
  groups: dict[str, list[str]] = {}
  for label, run in zip(labels, runs):
    groups.setdefault(label, []).append(run.name)
  shared = {label: re.sub(r"[-_.](s|seed)?$", "", os.path.commonprefix(names))
            for label, names in groups.items() if len(label) > MAX_LABEL and len(names) > 1}
  taken = [*shared.values(), *labels, *(run.name for run in runs)]
  return {label: name for label, name in shared.items() if name and taken.count(name) == 1}


def plot(runs: list[Run], path: str, with_wall_time: bool = True):
  """Train (thin) and val (dots) loss of every run against iteration and, unless not asked,
  against wall time, saved to `path`; one colour and legend entry per compared setting, the
  texts trained on in the title. Returns the matplotlib Figure."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    raise UserError("--plot needs matplotlib, which is not installed: "
                    "pip install matplotlib") from None
  figure = Figure(figsize=(12 if with_wall_time else 7, 4.5), layout="constrained")
  FigureCanvasAgg(figure)  # Agg: renders without a display.
  panels = figure.subplots(1, 2, sharey=True) if with_wall_time else [figure.subplots()]
  labels = compared(runs)
  colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}
  for run, label in zip(runs, labels):
    for axes, xs in zip(panels, ([r["iter"] for r in run.records], wall_times(run))):
      axes.plot(xs, [r["train_loss"] for r in run.records], color=colours[label], alpha=0.4,
                linewidth=1)
      evals = [(x, r["val_loss"]) for x, r in zip(xs, run.records) if "val_loss" in r]
      if evals:
        axes.plot(*zip(*evals), color=colours[label], marker="o", markersize=3, label=label)
  panels[0].set(xlabel="iteration", ylabel="loss", title="loss by iteration")
  if with_wall_time:
    panels[1].set(xlabel="wall time (s)", title="loss by wall time")
  texts = sorted({Path(run.flags["data"]).name for run in runs if run.flags.get("data")})
  figure.suptitle(f"{', '.join(texts) or 'the built-in sample'}: train loss (thin lines), "
                  "val loss (dots)")
  handles, names = panels[0].get_legend_handles_labels()
  unique = dict(zip(names, handles))  # Runs that differ only in their seed: one entry.
  panels[0].legend(unique.values(), unique.keys(), fontsize="small")
  try:
    figure.savefig(path, dpi=100)
  except (OSError, ValueError) as e:
    raise UserError(f"Cannot write --plot={path}: {e}") from None
  return figure


def report(paths: list[str]) -> None:
  if not paths:
    raise UserError("Name the runs to compare: python -m randygpt.report RUN_DIR... "
                    "(workdirs, or folders of them such as runs/my-sweep).")
  workdirs = find_runs(paths)
  common = Path(os.path.commonpath(workdirs))
  runs = [load(w, str(w.relative_to(common)) if w != common else w.name) for w in workdirs]
  columns, table = rows(runs, flags.FLAGS.sort)
  if flags.FLAGS.csv:
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
  else:
    print(format_table(columns, table))
  if flags.FLAGS.plot:
    plot(runs, flags.FLAGS.plot, flags.FLAGS.plot_wall_time)
    print(f"Wrote {flags.FLAGS.plot}", file=sys.stderr)


if __name__ == "__main__":
  app.run(cli.light_entry_point(report), flags_parser=cli.parse_flags)
