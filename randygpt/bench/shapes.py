"""--shapes: randygpt's train step (and its real loop) beside both PyTorch peers at several
shapes, in interleaved rounds so that a change in the machine's load touches them all."""

import dataclasses
import os
import tempfile
from pathlib import Path

from randygpt.bench.peers import check_torch_comparable, nanogpt_ms
from randygpt.bench.runs import loop_ms
from randygpt.bench.steps import measure_steps, prepare_step
from randygpt.bench.timing import percentile
from randygpt.errors import UserError

# --shapes presets: (n_layer, n_head, n_embd, block_size, batch_size, dropout).
SHAPES = {"tiny": (2, 4, 64, 64, 32, 0.1),  # experiments/tiny.cfg with the default batch.
          "nanogpt": (4, 4, 128, 64, 12, 0.0),  # nanoGPT's README example for a CPU.
          "default": (6, 8, 128, 64, 32, 0.1),
          "default-d0": (6, 8, 128, 64, 32, 0.0),
          "medium": (6, 8, 256, 128, 32, 0.1)}  # experiments/medium.cfg.


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


def measure_shapes(config, specs, *, steps: int, warmup_steps: int, repeats: int,
                   loop_iters: int, nanogpt_iters: int, script: str) -> list[dict]:
  """Per shape, `repeats` rounds of: randygpt's jitted step, torch_reference's step,
  nanoGPT's train.py (its own loop) and randygpt's real loop; the medians of the rounds."""
  import numpy as np

  from randygpt import torch_reference
  check_torch_comparable(config)
  results = []
  with tempfile.TemporaryDirectory() as cache:
    for spec in specs:
      cfg = shape_config(config, spec)
      prepared = prepare_step(cfg)
      model_config, state, batch = prepared.config.model, prepared.state, prepared.batch
      step, tokens = prepared.compile(), prepared.tokens
      rounds = {"randygpt": [], "torch_reference": [], "nanogpt": [], "randygpt_loop": []}
      if loop_iters:
        loop_ms(cfg, 2, Path(cache))  # Compiles into the cache.
      for _ in range(repeats):
        state, seconds = measure_steps(step, state, batch, steps, warmup_steps)
        rounds["randygpt"].append(1e3 * percentile(seconds, 50))
        rounds["torch_reference"].append(torch_reference.measure(
            model_config, cfg.train, np.asarray(tokens), steps, warmup_steps)["torch_ms_per_step"])
        if nanogpt_iters:
          rounds["nanogpt"].append(nanogpt_ms(script, cfg, nanogpt_iters))
        if loop_iters:
          rounds["randygpt_loop"].append(loop_ms(cfg, loop_iters, Path(cache)))
      row = {"shape": spec, "devices": prepared.plan.mesh.size,
             "microbatches": prepared.config.train.microbatches,
             "rounds": rounds, "load": os.getloadavg()[0]}
      row |= {name: percentile(values, 50) if values else None
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
