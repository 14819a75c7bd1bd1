"""How the train step computes, compared in one process: `--variants` times the run's step
once per setting of the flags that change how, not what, it computes (the compute dtype, the
attention, the microbatches), each compiled and timed as the one-shape report times it."""

import dataclasses
import time

from randygpt.bench.steps import measure_steps, prepare_step
from randygpt.bench.timing import percentile
from randygpt.errors import UserError

# The flags a variant may set: those that leave the parameters and the losses' meaning alone.
VARIANT_FLAGS = {"compute_dtype": str, "attention": str, "microbatches": int}
VARIANT_HEADER = ("| compute dtype | attention | microbatches | compile s | ms/step (p10-p90) |\n"
                  "|---|---|---|---|---|")


def parse_variant(text: str) -> dict:
  """`compute_dtype=bfloat16/attention=cudnn` -> {"compute_dtype": "bfloat16", ...}."""
  variant = {}
  for item in text.split("/"):
    name, _, value = item.partition("=")
    if name not in VARIANT_FLAGS or not value:
      raise UserError(f"--variants: '{item}' is not NAME=VALUE with NAME one of "
                      f"{', '.join(VARIANT_FLAGS)} (variants are separated by commas, their "
                      "settings by /).")
    try:
      variant[name] = VARIANT_FLAGS[name](value)
    except ValueError:
      raise UserError(f"--variants: '{item}': {name} takes a number.") from None
  return variant


def measure_variants(config, variants: list[str], steps: int, warmup_steps: int) -> list:
  """A row per variant: its resolved settings, compile seconds, median ms/step and the
  training device's peak memory (where its backend counts it)."""
  from randygpt.runtime import memory
  parsed = [(text, parse_variant(text)) for text in variants]  # Every mistake before any work.
  print(VARIANT_HEADER, flush=True)
  rows = []
  for text, variant in parsed:
    # Set as a flag is: the placement keeps what was given (a microbatch count too).
    prepared = prepare_step(dataclasses.replace(config.replace(**variant),
                                                explicit=config.explicit | set(variant)))
    start = time.perf_counter()
    step = prepared.compile()
    compile_s = time.perf_counter() - start
    _, seconds = measure_steps(step, prepared.state, prepared.batch, steps, warmup_steps)
    mc, tc = prepared.config.model, prepared.config.train
    rows.append({"variant": text, "compute_dtype": mc.compute_dtype, "attention": mc.attention,
                 "microbatches": tc.microbatches, "compile_s": compile_s,
                 "ms_per_step": 1e3 * percentile(seconds, 50),
                 "ms_per_step_p10": 1e3 * percentile(seconds, 10),
                 "ms_per_step_p90": 1e3 * percentile(seconds, 90),
                 "device_peak_mb": memory.device_peak_mb(prepared.plan.mesh.devices.flat[0])})
    print(variant_row(rows[-1]), flush=True)
  return rows


def variant_row(row: dict) -> str:
  """One row of the printed table."""
  return (f"| {row['compute_dtype']} | {row['attention']} | {row['microbatches']} | "
          f"{row['compile_s']:.1f} | {row['ms_per_step']:.2f} ({row['ms_per_step_p10']:.2f}-"
          f"{row['ms_per_step_p90']:.2f}) |")
