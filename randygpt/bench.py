"""Speed and cost, measured: `python -m randygpt.bench --flagfile=experiments/shakespeare.cfg`.

Times the real jitted train step after compilation and warm-up (and, with --torch, a
PyTorch eager implementation of the same model beside it), model FLOPs utilisation
against a measured matmul peak, the loss estimate, the generation loop and an async
checkpoint save (how long it blocks the loop, and that cost spread over
--checkpoint_interval steps). Then runs the real training program twice in fresh
workdirs sharing a new compilation cache: the start-up time of a cold and a warm cache,
and the resident memory after imports, at the compilation peak and in the steady state.
Prints a table, or one JSON line.
"""

import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags

from randygpt.runtime import cli
from randygpt import flags as randygpt_flags
from randygpt.runtime import memory
from randygpt.errors import UserError

flags.DEFINE_integer("steps", 50, "Timed training steps (after warm-up).", lower_bound=1)
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps after compilation.", lower_bound=0)
flags.DEFINE_integer("saves", 5, "Timed checkpoint saves (one every 10 steps).",
                     lower_bound=1)
flags.DEFINE_bool("torch", False, "Also time randygpt's PyTorch eager reference "
                  "(randygpt/torch_reference.py; pip install torch==2.13.0).")
flags.DEFINE_float("peak_gflops", 0.0, "The peak that model FLOPs utilisation is stated "
                   "against, in GFLOP/s; 0 measures a large f32 matmul on the training "
                   "devices.", lower_bound=0.0)
flags.DEFINE_integer("run_iters", 200, "Iterations of the real training run that measures "
                     "start-up and memory (its second half is the steady state); 0 skips it.",
                     lower_bound=0)
flags.DEFINE_list("text_sizes", [], "Measure start-up and peak memory against the text's "
                  "size instead: --data repeated to each of these sizes in bytes, e.g. "
                  "1e6,1e8,1e9 (first start builds the token cache, second reuses it).")
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_list("shapes", [], "Instead of the one-shape report: time randygpt's train step "
                  "beside both PyTorch peers (randygpt/torch_reference.py and nanoGPT's own "
                  "train.py) at these shapes, interleaved, in one table. Preset names ("
                  "tiny, nanogpt, default, default-d0, medium) or L/H/D/T/B/dropout, e.g. "
                  "4/4/128/64/12/0. The other flags (--steps, the learning rate...) apply.")
flags.DEFINE_integer("shape_repeats", 3, "With --shapes: rounds of randygpt, PyTorch, nanoGPT (and "
                     "the real loop) in turn; the table gives their medians.", lower_bound=1)
flags.DEFINE_integer("loop_iters", 0, "With --shapes: also time the real training loop "
                     "(randygpt.main, warm compilation cache) over this many iterations; "
                     "0 skips it.", lower_bound=0)
flags.DEFINE_integer("nanogpt_iters", 30, "With --shapes: iterations of each nanoGPT run (its "
                     "first 10 untimed); 0 skips nanoGPT.", lower_bound=0)
flags.DEFINE_string("nanogpt_script", str(Path(__file__).resolve().parents[2] / "shared" /
                                          "tools" / "nanogpt-bench.sh"),
                    "With --shapes: the script that times nanoGPT's train.py at a shape "
                    "(N_LAYER N_HEAD N_EMBD BLOCK BATCH DROPOUT ITERS; needs NANOGPT_GIT on "
                    "first use).")
flags.adopt_module_key_flags(randygpt_flags)

# --shapes presets: (n_layer, n_head, n_embd, block_size, batch_size, dropout).
SHAPES = {"tiny": (2, 4, 64, 64, 32, 0.1),  # experiments/tiny.cfg with the default batch.
          "nanogpt": (4, 4, 128, 64, 12, 0.0),  # nanoGPT's README example for a CPU.
          "default": (6, 8, 128, 64, 32, 0.1),
          "default-d0": (6, 8, 128, 64, 32, 0.0),
          "medium": (6, 8, 256, 128, 32, 0.1)}  # experiments/medium.cfg.

SAVE_EVERY = 10  # Steps between timed checkpoint saves.
GENERATION_STREAMS = 8  # Parallel samples in the batched generation timing.
LONG_GENERATION = 500  # New tokens in the generation timing that runs past the window.
TEXT_SIZE_ITERS = 20  # Iterations of each run that measures start-up against text size.


def _timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  jax_block(out)
  return out, time.perf_counter() - start


def jax_block(tree):
  import jax
  jax.block_until_ready(tree)


def _percentile(values, q):
  import numpy as np
  return float(np.percentile(values, q))


def measure_generation(params, model_config, sample_config) -> dict:
  """Generated tokens/s (all streams together) for 1 and GENERATION_STREAMS streams: within
  the context window with and without the key/value cache, and for LONG_GENERATION tokens."""
  import jax
  import numpy as np

  from randygpt import generate

  results = {}
  for streams in (1, GENERATION_STREAMS):
    prompt_BxP = np.zeros((streams, 1), np.int32)
    cases = {"window_cached": (model_config.block_size, True),
             "window_uncached": (model_config.block_size, False),
             f"{LONG_GENERATION}_cached": (LONG_GENERATION, True)}
    for name, (n_new, use_cache) in cases.items():
      config = dataclasses.replace(sample_config, max_new_tokens=n_new)
      run = functools.partial(generate.generate, params, prompt_BxP, model_config=model_config,
                              sample_config=config, use_cache=use_cache)
      _timed(run, jax.random.key(0))  # Compiles.
      seconds = min(_timed(run, jax.random.key(i))[1] for i in range(1, 4))
      results[f"generate_{name}_x{streams}_tokens_per_sec"] = streams * n_new / seconds
  return results


def measure_peak_gflops(mesh, n: int = 2048) -> float:
  """f32 GFLOP/s of an n x n x n matmul split across the training devices (best of 5)."""
  import jax
  import jax.numpy as jnp

  from randygpt.runtime import devices
  a = jax.device_put(jnp.ones((n, n)), devices.batch_sharded(mesh))
  b = jax.device_put(jnp.ones((n, n)), devices.replicated(mesh))
  matmul = jax.jit(jnp.matmul)
  _timed(matmul, a, b)
  return 2 * n**3 / min(_timed(matmul, a, b)[1] for _ in range(5)) / 1e9


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


def measure_steps(step, state, batch, steps: int, warmup_steps: int):
  """Seconds of each of `steps` timed train steps after `warmup_steps` untimed ones, with
  the memory compiling left behind released first, as the training loop does."""
  import jax
  for i in range(warmup_steps):
    state, _ = step(state, batch, jax.random.key(i))
  memory.release_free_memory()
  step_seconds = []
  for i in range(steps):
    (state, _), seconds = _timed(step, state, batch, jax.random.key(i))
    step_seconds.append(seconds)
  return state, step_seconds


def measure_checkpoints(step, state, batch, saves: int) -> dict:
  """The time a save blocks the loop (its state computed), and the whole cost (background
  writing competes for the same cores) from timed runs with and without saves."""
  import jax

  from randygpt import checkpoint
  save_steps = itertools.count(1)

  def run_steps(state, n, checkpoints=None):
    blocked = []
    start = time.perf_counter()
    for i in range(n):
      state, _ = step(state, batch, jax.random.key(i))
      if checkpoints and i % SAVE_EVERY == 0:
        jax_block(state)
        blocked.append(checkpoints.save("latest", next(save_steps), state,
                                        {"format": checkpoint.FORMAT}))
    if checkpoints:
      checkpoints.wait()
    jax_block(state)
    return state, time.perf_counter() - start, blocked

  n_save_steps = SAVE_EVERY * saves
  with tempfile.TemporaryDirectory() as tmp:
    checkpoints = checkpoint.Checkpoints(Path(tmp))
    state, _, _ = run_steps(state, SAVE_EVERY, checkpoints)  # Creates the Orbax manager.
    state, with_saves_s, blocked = run_steps(state, n_save_steps, checkpoints)
    checkpoints.close()
  state, without_saves_s, _ = run_steps(state, n_save_steps)
  return {"save_ms": 1e3 * _percentile(blocked, 50), "save_ms_max": 1e3 * max(blocked),
          "save_cost_ms": 1e3 * max(with_saves_s - without_saves_s, 0.0) / len(blocked)}


def measure_eval_and_generation(params, tokens, placement, tc, model_config, sample) -> dict:
  """Loss-estimate throughput and generation speed on the evaluation device."""
  import jax

  from randygpt import evaluate
  evaluator = evaluate.Evaluator(placement.eval_device, model_config, sample,
                                 {"train": tokens, "val": tokens}, jax.random.key(3), tc)
  evaluator(params)  # Compiles.
  _, eval_s = _timed(evaluator, params)
  tokens_per_step = tc.batch_size * model_config.block_size
  return {"eval_tokens_per_sec": 2 * tc.eval_iters * tokens_per_step / eval_s,
          **measure_generation(evaluator.place(params), model_config, sample)}


def prepare_step(config):
  """The bench's data, devices, initial state, jitted train step and one batch."""
  import jax

  from randygpt import data, train
  from randygpt.runtime import cli, devices, platforms
  dc = config.data
  corpus = data.load_corpus(dc.data, cli.cache_dir("tokens"), url=dc.data_url,
                            encoding=dc.data_encoding, tokenizer=dc.tokenizer)
  model_config = dataclasses.replace(config.model, vocab_size=corpus.tokenizer.vocab_size)
  tc, loc = config.train, config.location
  placement = platforms.place(loc.train_platform, loc.eval_platform, devices.cpu_device_count(
      loc.num_cpu_devices, tc.batch_size))
  mesh = devices.data_mesh(placement.train_devices)
  devices.check_batch_divides(tc.batch_size, mesh.size)
  state = train.initial_state(jax.random.key(0), model_config, tc, None,
                              devices.replicated(mesh))
  microbatches = train.train_microbatches(tc, model_config, mesh.devices.flat[0].platform,
                                          mesh.size)
  step = train.jit_train_step(model_config, tc, mesh, microbatches)
  batch = jax.device_put(data.get_batch(corpus.tokens, jax.random.key(1), tc.batch_size,
                                        model_config.block_size), devices.batch_sharded(mesh))
  return model_config, placement, mesh, microbatches, state, step, corpus.tokens, batch


def check_torch_comparable(config) -> None:
  """torch_reference.py is randyGPT's architecture with AdamW: refuses a config with levers."""
  levers = [f"--{name}" for name, on in (
      ("position", config.model.position != "learned"), ("qk_norm", config.model.qk_norm),
      ("final_norm", config.model.final_norm), ("optimizer", config.train.optimizer != "adamw"))
      if on]
  if levers:
    raise UserError(f"--torch times randyGPT's architecture with AdamW, not {', '.join(levers)}: "
                    "drop those flags or --torch.")


def measure(config, *, steps: int, warmup_steps: int, saves: int, with_torch: bool,
            peak_gflops: float) -> dict:
  import jax
  import numpy as np

  from randygpt import model
  if with_torch:
    check_torch_comparable(config)
  model_config, placement, mesh, microbatches, state, step, tokens, batch = prepare_step(config)
  tc = config.train
  start = time.perf_counter()
  step = step.lower(state, batch, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - start
  state, step_seconds = measure_steps(step, state, batch, steps, warmup_steps)
  ms_per_step = 1e3 * _percentile(step_seconds, 50)
  tokens_per_sec = tc.batch_size * model_config.block_size / (ms_per_step / 1e3)
  peak_given = bool(peak_gflops)
  peak_gflops = peak_gflops or measure_peak_gflops(mesh)
  flops_per_token = model.train_flops_per_token(model_config)
  reference = {}
  if with_torch:
    try:
      from randygpt import torch_reference
    except ImportError:
      raise UserError("--torch needs PyTorch: pip install torch==2.13.0") from None
    reference = torch_reference.measure(model_config, tc, np.asarray(tokens), steps,
                                        warmup_steps)
    reference["speedup_vs_torch"] = tokens_per_sec / reference["torch_tokens_per_sec"]
  others = measure_eval_and_generation(state["params"], tokens, placement, tc, model_config,
                                       config.sample)
  saves = measure_checkpoints(step, state, batch, saves)
  interval_ms = tc.checkpoint_interval * ms_per_step
  return {
      "shape": f"{model_config.n_layer}x{model_config.n_embd}/{model_config.n_head}h, "
               f"block {model_config.block_size}, batch {tc.batch_size}",
      "n_params": model.n_params(model_config),
      "devices": f"{mesh.size} x {mesh.devices.flat[0].platform} (data-parallel)",
      "eval_device": f"{placement.eval_device.platform}:{placement.eval_device.id}",
      "microbatches": microbatches, "compile_s": compile_s, "ms_per_step": ms_per_step,
      "ms_per_step_p10": 1e3 * _percentile(step_seconds, 10),
      "ms_per_step_p90": 1e3 * _percentile(step_seconds, 90),
      "tokens_per_sec": tokens_per_sec, "flops_per_token": flops_per_token,
      "peak_gflops": peak_gflops, "peak_given": peak_given,
      "mfu_pct": 100 * flops_per_token * tokens_per_sec / (peak_gflops * 1e9),
      **reference, **others,
      "checkpoint_save_blocked_ms": saves["save_ms"],
      "checkpoint_save_blocked_ms_max": saves["save_ms_max"],
      "checkpoint_save_total_cost_ms": saves["save_cost_ms"],
      "checkpoint_interval": tc.checkpoint_interval,
      "checkpoint_blocked_overhead_pct": 100 * saves["save_ms"] / interval_ms,
      "checkpoint_total_overhead_pct": 100 * saves["save_cost_ms"] / interval_ms,
      "bench_peak_rss_mb": memory.peak_resident_mb(),
  }


def generation_rows(result) -> list:
  rows = []
  for streams in (1, GENERATION_STREAMS):
    speeds = {case: result[f"generate_{case}_x{streams}_tokens_per_sec"]
              for case in ("window_cached", "window_uncached", f"{LONG_GENERATION}_cached")}
    rows += [
        (f"generation in the window, {streams} stream(s)",
         f"{speeds['window_cached']:,.0f} tokens/s cached, {speeds['window_uncached']:,.0f} "
         f"uncached ({speeds['window_cached'] / speeds['window_uncached']:.1f}x)"),
        (f"generation of {LONG_GENERATION} tokens, {streams} stream(s)",
         f"{speeds[f'{LONG_GENERATION}_cached']:,.0f} tokens/s"),
    ]
  return rows


def table_rows(result: dict) -> list[tuple[str, str]]:
  """The benchmark's result as (name, value) rows of the printed table."""
  rows = [
      ("shape", result["shape"]),
      ("parameters", f"{result['n_params']:,}"),
      ("devices", f"{result['devices']}, {result['microbatches']} microbatch(es) per step"),
      ("compile train step", f"{result['compile_s']:.2f} s"),
      ("train step (median, p10-p90)", f"{result['ms_per_step']:.1f} ms "
       f"({result['ms_per_step_p10']:.1f}-{result['ms_per_step_p90']:.1f})"),
      ("training throughput", f"{result['tokens_per_sec']:,.0f} tokens/s"),
      ("model FLOPs utilisation", f"{result['mfu_pct']:.1f}% of {result['peak_gflops']:.0f} "
       f"GFLOP/s ({result['flops_per_token'] / 1e6:.2f} MFLOP/token; peak "
       f"{'given' if result.get('peak_given') else 'measured: f32 matmul 2048^3'})"),
  ]
  if "torch_ms_per_step" in result:
    rows += [
        (f"PyTorch {result['torch_version']} eager", f"{result['torch_ms_per_step']:.1f} ms "
         f"({result['torch_ms_per_step_p10']:.1f}-{result['torch_ms_per_step_p90']:.1f}), "
         f"{result['torch_tokens_per_sec']:,.0f} tokens/s, {result['torch_threads']} threads, "
         f"{result['torch_adamw']} AdamW"),
        ("randygpt / PyTorch", f"{result['speedup_vs_torch']:.2f}x tokens/s"),
    ]
  rows += [
      ("loss estimate throughput", f"{result['eval_tokens_per_sec']:,.0f} tokens/s"),
      ("evaluation and generation on", result["eval_device"]),
      *generation_rows(result),
      ("checkpoint save blocks the loop", f"{result['checkpoint_save_blocked_ms']:.1f} ms "
       f"(max {result['checkpoint_save_blocked_ms_max']:.1f}) = "
       f"{result['checkpoint_blocked_overhead_pct']:.3f}% at --checkpoint_interval="
       f"{result['checkpoint_interval']}"),
      ("checkpoint save, whole cost", f"{result['checkpoint_save_total_cost_ms']:.1f} ms = "
       f"{result['checkpoint_total_overhead_pct']:.3f}% (with vs without saves)"),
  ]
  if "startup_warm_s" in result:
    rows += [
        ("start-up to first iteration", f"{result['startup_cold_s']:.1f} s cold cache, "
         f"{result['startup_warm_s']:.1f} s warm (after the imports)"),
        ("training run memory (resident)", f"{result['rss_after_imports_mb']:.0f} MB after "
         f"imports, {result['rss_compile_peak_mb']:.0f} MB compile peak, "
         f"{result['rss_steady_mb']:.0f} MB steady (max of iterations "
         f"{result['rss_steady_iters'] // 2}-{result['rss_steady_iters']})"),
    ]
  rows.append(("benchmark process peak memory", f"{result['bench_peak_rss_mb']:.0f} MB"))
  return rows


def text_size_table(rows: list[dict]) -> str:
  lines = ["text          first start  second start  peak (first, second)"]
  for r in rows:
    lines.append(f"{r['text_bytes'] / 1e6:>8,.0f} MB  {r['first_startup_s']:>9.1f} s  "
                 f"{r['second_startup_s']:>10.1f} s  {r['first_peak_mb']:,.0f} MB, "
                 f"{r['second_peak_mb']:,.0f} MB")
  return "\n".join(lines)


def parse_shape(spec: str) -> tuple:
  if spec in SHAPES:
    return SHAPES[spec]
  parts = spec.split("/")
  try:
    if len(parts) == 6:
      return (*map(int, parts[:5]), float(parts[5]))
  except ValueError:
    pass
  raise UserError(f"--shapes: {spec!r} is neither a preset ({', '.join(SHAPES)}) nor "
                  "L/H/D/T/B/dropout, e.g. 4/4/128/64/12/0.")


def shape_config(config, spec: str):
  n_layer, n_head, n_embd, block, batch, dropout = parse_shape(spec)
  return dataclasses.replace(
      config, model=dataclasses.replace(config.model, n_layer=n_layer, n_head=n_head,
                                        n_embd=n_embd, block_size=block, dropout=dropout),
      train=dataclasses.replace(config.train, batch_size=batch))


def nanogpt_ms(script: str, config, iters: int) -> float:
  """nanoGPT's train.py median ms/iteration at this shape, from the shared script."""
  mc, tc = config.model, config.train
  done = subprocess.run([script, *map(str, (mc.n_layer, mc.n_head, mc.n_embd, mc.block_size,
                                            tc.batch_size, mc.dropout, iters))],
                        capture_output=True, text=True)
  words = done.stdout.split()
  if done.returncode or "median" not in words:
    raise UserError(f"The nanoGPT timing failed ({script}): "
                    f"{(done.stdout + done.stderr).strip()[-300:]}")
  return float(words[words.index("median") + 1])


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
  return _percentile(timed[1:] or timed, 50)  # The first includes the first step's wait.


def measure_shapes(config, specs, *, steps: int, warmup_steps: int, repeats: int,
                   loop_iters: int, nanogpt_iters: int, script: str) -> list[dict]:
  """Per shape, `repeats` rounds of: randygpt's jitted step, torch_reference's step,
  nanoGPT's train.py (its own loop) and randygpt's real loop; the medians of the rounds."""
  import jax
  import numpy as np

  from randygpt import torch_reference
  check_torch_comparable(config)
  results = []
  with tempfile.TemporaryDirectory() as cache:
    for spec in specs:
      cfg = shape_config(config, spec)
      model_config, _, mesh, microbatches, state, step, tokens, batch = prepare_step(cfg)
      step = step.lower(state, batch, jax.random.key(2)).compile()
      rounds = {"randygpt": [], "torch_reference": [], "nanogpt": [], "randygpt_loop": []}
      if loop_iters:
        loop_ms(cfg, 2, Path(cache))  # Compiles into the cache.
      for _ in range(repeats):
        state, seconds = measure_steps(step, state, batch, steps, warmup_steps)
        rounds["randygpt"].append(1e3 * _percentile(seconds, 50))
        rounds["torch_reference"].append(torch_reference.measure(
            model_config, cfg.train, np.asarray(tokens), steps, warmup_steps)["torch_ms_per_step"])
        if nanogpt_iters:
          rounds["nanogpt"].append(nanogpt_ms(script, cfg, nanogpt_iters))
        if loop_iters:
          rounds["randygpt_loop"].append(loop_ms(cfg, loop_iters, Path(cache)))
      row = {"shape": spec, "devices": mesh.size, "microbatches": microbatches,
             "rounds": rounds, "load": os.getloadavg()[0]}
      row |= {name: _percentile(values, 50) if values else None
              for name, values in rounds.items()}
      peers = [row[p] for p in ("torch_reference", "nanogpt") if row[p] is not None]
      row["step_vs_faster_peer"] = min(peers) / row["randygpt"]
      if row["randygpt_loop"] is not None:
        row["loop_vs_faster_peer"] = min(peers) / row["randygpt_loop"]
      results.append(row)
      print(shapes_table([row], header=not results[:-1]), flush=True)
  return results


def shapes_table(rows, header: bool = True) -> str:
  def ms(value):
    return "-" if value is None else f"{value:.1f}"
  lines = ["| shape | devices x microbatches | randygpt step ms | torch_reference ms | nanoGPT "
           "train.py ms/iter | randygpt loop ms/iter | step vs faster peer | loop vs faster "
           "peer | load (1 min) |", "|---|---|---|---|---|---|---|---|---|"] if header else []
  for r in rows:
    loop_ratio = r.get("loop_vs_faster_peer")
    lines.append(f"| {r['shape']} | {r['devices']} x {r['microbatches']} | {ms(r['randygpt'])} "
                 f"| {ms(r['torch_reference'])} | {ms(r['nanogpt'])} | {ms(r['randygpt_loop'])} "
                 f"| {r['step_vs_faster_peer']:.2f}x | "
                 f"{'-' if loop_ratio is None else f'{loop_ratio:.2f}x'} | {r['load']:.1f} |")
  return "\n".join(lines)


def bench():
  config = randygpt_flags.run_config()
  if flags.FLAGS.text_sizes:
    try:
      sizes = [int(float(size)) for size in flags.FLAGS.text_sizes]
      if min(sizes) < 1:
        raise ValueError
    except (ValueError, OverflowError):
      raise UserError(f"--text_sizes={','.join(flags.FLAGS.text_sizes)}: give sizes in "
                      "bytes, e.g. 1e6,1e8.") from None
    rows = measure_text_sizes(config, sizes)
    print(json.dumps(rows) if flags.FLAGS.json else text_size_table(rows))
    return
  if flags.FLAGS.shapes:
    try:
      import torch  # noqa: F401
    except ImportError:
      raise UserError("--shapes needs PyTorch: pip install torch==2.13.0") from None
    rows = measure_shapes(config, flags.FLAGS.shapes, steps=flags.FLAGS.steps,
                          warmup_steps=flags.FLAGS.warmup_steps, repeats=flags.FLAGS.shape_repeats,
                          loop_iters=flags.FLAGS.loop_iters,
                          nanogpt_iters=flags.FLAGS.nanogpt_iters,
                          script=flags.FLAGS.nanogpt_script)
    if flags.FLAGS.json:
      print(json.dumps(rows))
    return
  result = measure(config, steps=flags.FLAGS.steps, warmup_steps=flags.FLAGS.warmup_steps,
                   saves=flags.FLAGS.saves, with_torch=flags.FLAGS.torch,
                   peak_gflops=flags.FLAGS.peak_gflops)
  if flags.FLAGS.run_iters:
    result |= measure_training_runs(config, flags.FLAGS.run_iters)
  if flags.FLAGS.json:
    print(json.dumps(result))
    return
  rows = table_rows(result)
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
  app.run(cli.entry_point(bench), flags_parser=cli.parse_flags)
