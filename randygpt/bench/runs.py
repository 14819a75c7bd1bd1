"""The real training program (`python -m randygpt.main`) in child processes: start-up with a
cold and a warm compilation cache, resident memory, start-up against the text's size, and
the loop's own ms/iteration. Processes by design: each start is a fresh one."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from randygpt.bench.timing import percentile
from randygpt.errors import UserError

TEXT_SIZE_ITERS = 20  # Iterations of each run that measures start-up against text size.


def _main_args(config, tmp: Path) -> list[str]:
  """`python -m randygpt.main` with this configuration, from a flag file in `tmp`."""
  loc, tc = config.location, config.train
  flagfile = tmp / "flags.cfg"
  flagfile.write_text(config.flagfile(), encoding="utf-8")
  return [sys.executable, "-m", "randygpt.main", f"--flagfile={flagfile}",
          f"--lr_decay_iters={tc.lr_decay_iters or tc.iters}",  # The same step every time.
          f"--train_platform={loc.train_platform}", f"--eval_platform={loc.eval_platform}",
          f"--num_cpu_devices={loc.num_cpu_devices}"]


def _run_main(args: list[str], workdir: Path, env: dict) -> dict:
  """Runs the training program; returns its summary.json."""
  done = subprocess.run([*args, f"--workdir={workdir}"], env=env, capture_output=True,
                        text=True)
  if done.returncode:
    raise UserError(f"The training run for start-up and memory failed: "
                    f"{done.stderr.strip()[-500:]}")
  return json.loads((workdir / "summary.json").read_text())


def measure_training_runs(config, iters: int) -> dict:
  """Runs `python -m randygpt.main` with this configuration twice, in fresh workdirs that
  share a new compilation cache: 1 iteration (cold cache), then `iters` (warm). Their
  start-up times, and the second run's memory from its summary and metrics."""
  from randygpt import metrics
  with tempfile.TemporaryDirectory() as tmp:
    args = _main_args(config, Path(tmp))
    env = {**os.environ, "RANDYGPT_CACHE": str(Path(tmp) / "cache")}
    runs = {name: _run_main([*args, f"--iters={n}"], Path(tmp) / name, env)
            for name, n in (("cold", 1), ("warm", iters))}
    records = metrics.read_records(Path(tmp) / "warm" / "metrics.jsonl")
  steady = [r["rss_mb"] for r in records if r["iter"] > iters // 2 and r.get("rss_mb")]
  warm = runs["warm"]["memory_mb"]
  return {"startup_cold_s": runs["cold"]["startup_s"],
          "startup_warm_s": runs["warm"]["startup_s"],
          "rss_after_imports_mb": warm["after_imports"],
          "rss_compile_peak_mb": warm["compile_peak"],
          "rss_steady_mb": max(steady, default=None), "rss_steady_iters": iters,
          "rss_peak_mb": warm["peak"]}


def measure_text_sizes(config, sizes: list[int], iters: int = TEXT_SIZE_ITERS) -> list[dict]:
  """Start-up and peak memory of `iters`-iteration runs on --data repeated to each size:
  the first start on that text (its token cache built, the compilation cache warmed by a
  run on --data first) and the second (a new workdir, the cache reused)."""
  with tempfile.TemporaryDirectory() as tmp:
    args = [*_main_args(config, Path(tmp)), f"--iters={iters}"]
    env = {**os.environ, "RANDYGPT_CACHE": str(Path(tmp) / "cache")}
    _run_main(args, Path(tmp) / "warm-up", env)
    rows = []
    for size in sizes:
      text = Path(tmp) / f"text-{size}.txt"
      _repeat_to(Path(config.data.data), text, size)
      first, second = (_run_main([*args, f"--data={text}"], Path(tmp) / f"{size}-{n}", env)
                       for n in ("first", "second"))
      rows.append({"text_bytes": text.stat().st_size, "first_startup_s": first["startup_s"],
                   "second_startup_s": second["startup_s"],
                   "first_peak_mb": first["memory_mb"]["peak"],
                   "second_peak_mb": second["memory_mb"]["peak"]})
      text.unlink()
  return rows


def _repeat_to(source: Path, dest: Path, size: int) -> None:
  """`dest`: `source` repeated until it holds at least `size` bytes."""
  unit = source.read_bytes()
  with open(dest, "wb") as out:
    for _ in range(-(-size // len(unit))):
      out.write(unit)


def loop_ms(config, iters: int, cache: Path) -> float:
  """randygpt.main's median ms/iteration over `iters` iterations (the log lines' ms/it,
  every 10 iterations, less the first), its compilation cached by a run before."""
  with tempfile.TemporaryDirectory() as tmp:
    flagfile = Path(tmp) / "flags.cfg"
    flagfile.write_text(config.flagfile(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "randygpt.main", f"--flagfile={flagfile}", f"--iters={iters}",
         f"--workdir={Path(tmp) / 'w'}", "--log_interval=10", f"--eval_interval={iters}",
         "--eval_iters=1", "--max_new_tokens=1", f"--checkpoint_interval={iters}"],
        env={**os.environ, "RANDYGPT_CACHE": str(cache)}, capture_output=True, text=True)
    if done.returncode:
      raise UserError(f"The training loop timing failed: {done.stderr.strip()[-300:]}")
    from randygpt import metrics
    records = metrics.read_records(Path(tmp) / "w" / "metrics.jsonl")
  timed = [r["ms_per_iter"] for r in records if "ms_per_iter" in r]
  return percentile(timed[1:] or timed, 50)  # The first includes the first step's wait.
