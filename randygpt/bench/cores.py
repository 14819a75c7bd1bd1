"""--cores: randygpt beside both PyTorch peers on the first k cores of this machine, for each k.
Every timing is a process of its own pinned to k cores (one hardware thread of each core
first, runtime/cores.py), with k threads (torch.set_num_threads and OMP_NUM_THREADS for the
peers; XLA sizes its pool from the affinity): randygpt's automatic placement there, the
manual settings that bracket it (half and double its devices), torch_reference and nanoGPT's
train.py, in interleaved rounds; the table gives each one's median of the rounds."""

import json
import os
import subprocess
import sys
import tempfile

from randygpt.bench.timing import percentile
from randygpt.errors import UserError
from randygpt.runtime import cores, placement

RUNNERS = ("randygpt", "randygpt_half", "randygpt_double", "torch_reference", "nanogpt")


# Pins itself to argv[1]'s CPUs, then becomes argv[2:]: no fork-time code in this process,
# whose JAX threads make preexec_fn unsafe.
_PIN = ("import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); "
        "os.execvp(sys.argv[2], sys.argv[2:])")


def pinned(cpus: list[int], command: list[str]) -> list[str]:
  """`command` run on `cpus` alone."""
  return [sys.executable, "-c", _PIN, ",".join(map(str, cpus)), *command]


def thread_env(cpus: list[int], env: dict) -> dict:
  """`env` with the PyTorch peers' thread count: one per CPU they run on."""
  return {**env, "OMP_NUM_THREADS": str(len(cpus)), "MKL_NUM_THREADS": str(len(cpus))}


def core_sets(counts: list[int]) -> dict[int, list[int]]:
  """The CPUs of the first k cores this process may use, for each k asked for."""
  if not hasattr(os, "sched_getaffinity"):
    raise UserError("--cores pins each timing to k cores: this system has no CPU affinity "
                    "(Linux has); run the benchmark without --cores.")
  allowed = sorted(os.sched_getaffinity(0))
  machine = cores.usable()
  if max(counts) > machine.cpus:
    raise UserError(f"--cores={','.join(map(str, counts))}: this process may use "
                    f"{machine.cpus} CPUs{f' ({machine.why})' if machine.why else ''}.")
  core_of = cores.core_siblings(allowed)
  return {k: cores.first_cores(k, allowed, core_of) for k in counts}


def brackets(auto: int, batch_size: int) -> dict[str, int | None]:
  """The device counts half and double the automatic one (divisors of the batch: the
  largest up to half, the smallest from double; None where there is none)."""
  divisors = placement.divisors(batch_size)
  half = max((d for d in divisors if d <= auto // 2), default=None)
  double = min((d for d in divisors if 2 * auto <= d <= placement.MAX_CPU_DEVICES),
               default=None)
  return {"randygpt_half": half, "randygpt_double": double}


def child_run(argv: list[str], spec: str, runner: str, devices: int, cpus: list[int],
              env: dict) -> dict:
  """One timing in a process pinned to `cpus`: `python -m randygpt.bench` with the parent's
  flags, at one shape, timing one runner once."""
  args = [sys.executable, "-m", "randygpt.bench", *argv, f"--shapes={spec}", "--json",
          f"--core_runner={runner}", f"--num_cpu_devices={devices}"]
  done = subprocess.run(pinned(cpus, args), capture_output=True, text=True,
                        env=thread_env(cpus, env))
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    raise UserError(f"The {runner} timing on {len(cpus)} cores failed: "
                    f"{(done.stdout + done.stderr).strip()[-400:]}")
  return json.loads(lines[-1])


def _one_round(config, argv, spec, cpus, env, *, with_brackets: bool, nanogpt_iters: int,
               script: str) -> dict:
  """randygpt (automatic, then its brackets), torch_reference and nanoGPT once on `cpus`."""
  from randygpt.bench.peers import nanogpt_ms
  from randygpt.bench.shapes import shape_config
  got = {"randygpt": child_run(argv, spec, "randygpt", 0, cpus, env)}
  batch = shape_config(config, spec).train.batch_size
  for name, devices in brackets(got["randygpt"]["devices"], batch).items():
    if devices and with_brackets:
      got[name] = child_run(argv, spec, "randygpt", devices, cpus, env)
  got["torch_reference"] = child_run(argv, spec, "torch_reference", 0, cpus, env)
  if nanogpt_iters:
    got["nanogpt"] = {"ms": nanogpt_ms(script, shape_config(config, spec), nanogpt_iters,
                                       wrap=lambda command: pinned(cpus, command),
                                       env=thread_env(cpus, env))}
  return got


def measure_cores(config, specs, counts, *, argv: list[str], repeats: int, nanogpt_iters: int,
                  script: str, with_brackets: bool) -> list[dict]:
  """Per shape and core count, `repeats` interleaved rounds of every runner, each in a pinned
  process sharing one compilation cache; one row each with the medians."""
  from randygpt.bench.shapes import parse_shape
  for spec in specs:
    parse_shape(spec)
  sets = core_sets(counts)
  rounds = {}
  with tempfile.TemporaryDirectory() as cache:
    env = {**os.environ, "RANDYGPT_CACHE": os.environ.get("RANDYGPT_CACHE", cache)}
    for r in range(repeats):
      for spec in specs:
        for k in counts:
          got = _one_round(config, argv, spec, sets[k], env, with_brackets=with_brackets,
                           nanogpt_iters=nanogpt_iters, script=script)
          for name, result in got.items():
            rounds.setdefault((spec, k), {}).setdefault(name, []).append(result)
          print(f"round {r + 1}/{repeats}, {spec} on {k} cores: " + ", ".join(
              f"{name} {result['ms']:.1f} ms" for name, result in got.items()),
              file=sys.stderr, flush=True)
  rows = [core_row(spec, k, sets[k], rounds[(spec, k)]) for spec in specs for k in counts]
  print(cores_table(rows), flush=True)
  return rows


def core_row(spec: str, k: int, cpus: list[int], rounds: dict) -> dict:
  """A table row: each runner's median ms over the rounds, randygpt's devices x microbatches,
  and the automatic placement against the faster peer and against its brackets."""
  row = {"shape": spec, "cores": k, "cpus": cpus,
         "rounds": {name: [r["ms"] for r in results] for name, results in rounds.items()}}
  for name in RUNNERS:
    results = rounds.get(name)
    row[name] = percentile([r["ms"] for r in results], 50) if results else None
    if results and "devices" in results[0]:
      row[f"{name}_placement"] = f"{results[0]['devices']} x {results[0]['microbatches']}"
  peers = [row[p] for p in ("torch_reference", "nanogpt") if row[p] is not None]
  row["auto_vs_faster_peer"] = min(peers) / row["randygpt"] if peers else None
  variants = [row[v] for v in RUNNERS[:3] if row[v] is not None]
  row["auto_vs_best_bracket"] = min(variants) / row["randygpt"]
  return row


def cores_table(rows) -> str:
  def ms(row, name):
    if row[name] is None:
      return "-"
    placed = row.get(f"{name}_placement")
    return f"{row[name]:.1f}" + (f" ({placed})" if placed else "")

  def ratio(value):
    return "-" if value is None else f"{value:.2f}x"
  lines = ["| shape | cores | randygpt auto ms (devices x microbatches) | half the devices | "
           "double the devices | torch_reference ms | nanoGPT train.py ms/iter | auto vs "
           "faster peer | best randygpt / auto |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['cores']} | {ms(r, 'randygpt')} | "
                 f"{ms(r, 'randygpt_half')} | {ms(r, 'randygpt_double')} | "
                 f"{ms(r, 'torch_reference')} | {ms(r, 'nanogpt')} | "
                 f"{ratio(r['auto_vs_faster_peer'])} | {ratio(r['auto_vs_best_bracket'])} |")
  return "\n".join(lines)


def time_runner(config, spec: str, runner: str, *, steps: int, warmup_steps: int) -> dict:
  """What one pinned child times (--core_runner): randygpt's jitted step as its placement
  chooses on this process's cores, or torch_reference's step on one thread per usable CPU."""
  import numpy as np

  from randygpt.bench.shapes import shape_config
  from randygpt.bench.steps import measure_steps, prepare_step
  cfg = shape_config(config, spec)
  machine = cores.usable()
  if runner == "torch_reference":
    from randygpt import torch_reference, trainer
    corpus, _ = trainer.read_text(cfg)
    cfg = cfg.replace(vocab_size=corpus.tokenizer.vocab_size)
    ms = torch_reference.measure(cfg.model, cfg.train, np.asarray(corpus.tokens), steps,
                                 warmup_steps)["torch_ms_per_step"]
    return {"ms": ms, "threads": machine.cpus}
  prepared = prepare_step(cfg)
  _, seconds = measure_steps(prepared.compile(), prepared.state, prepared.batch, steps,
                             warmup_steps)
  return {"ms": 1e3 * percentile(seconds, 50), "devices": prepared.plan.mesh.size,
          "microbatches": prepared.config.train.microbatches, "threads": machine.cpus,
          "why": prepared.plan.why_devices}
