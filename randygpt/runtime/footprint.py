"""An estimate of the host memory a run needs, checked before anything big is allocated: a
run the machine cannot hold gets one line naming the flags, not the kernel's OOM killer.

The parts are what the measured peaks of the presets are made of (docs/measurements.md,
"Memory"): the process after its imports, XLA compiling and running the step, the train
state on every training device, one microbatch's activations per device, the loss
estimate's windows and chunk, and sampling. The text itself takes none: its windows are
read from the token file as needed (docs/data.md), into the kernel's page cache, which the
kernel can drop.
"""

import os

from randygpt import model
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt.errors import UserError
from randygpt.runtime import memory

FLOAT_BYTES = 4
# Floats kept per parameter and training device during a step: weights, gradients, two Adam
# moments, and the new weights before the donated old ones are freed.
STATE_COPIES = 5
# Floats per token and layer kept for the backward pass (q, k, v, attention output, the
# 4x MLP twice, norms, residuals), with the attention scores on top.
ACTIVATIONS_PER_EMBD = 16
# What XLA holds beyond the arrays while it compiles and runs a train step: 85-100 MB
# with a warm compilation cache, 180-270 MB with a cold one, over the presets; a bit more
# with more layers (the step unrolls them).
XLA_BASE_BYTES = 150 << 20
XLA_BYTES_PER_LAYER = 4 << 20


def physical_memory() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def human_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
    n /= 1000


def activations(mc: ModelConfig, tokens: int, backward: bool = True) -> int:
  """Bytes of `tokens` tokens' activations (kept for the backward pass when `backward`)."""
  per_layer = ACTIVATIONS_PER_EMBD * mc.n_embd + 2 * mc.n_head * mc.block_size
  layers = mc.n_layer if backward else 1
  return FLOAT_BYTES * tokens * (layers * per_layer + 3 * mc.vocab_size)


def _sampling(mc: ModelConfig, sample: SampleConfig) -> int:
  per_sample = (sample.max_new_tokens + mc.block_size  # The token buffer.
                + 2 * mc.n_layer * mc.block_size * mc.n_embd  # The key/value cache.
                + 4 * mc.vocab_size)  # Logits while drawing.
  return FLOAT_BYTES * sample.num_samples * per_sample


def estimate(mc: ModelConfig, sample: SampleConfig, tc: TrainConfig | None = None, *,
             devices: int = 1, microbatches: int = 1, on_cpu: bool = True,
             eval_chunk_tokens: int = 2048,
             baseline_bytes: int = 0) -> dict[str, int]:
  """Bytes by what needs them, keyed by the flags that set them (training needs `tc`;
  `on_cpu`: its state and activations are in host memory)."""
  params = FLOAT_BYTES * model.n_params(mc)
  parts = {"the process after its imports": baseline_bytes,
           "XLA (--n_layer)": XLA_BASE_BYTES + XLA_BYTES_PER_LAYER * mc.n_layer,
           "--num_samples, --max_new_tokens": _sampling(mc, sample)}
  average = 1 if tc is not None and tc.ema_decay else 0  # --ema_decay's copy of the weights.
  if tc is None or not on_cpu:
    parts["--n_embd, --n_layer"] = params * (1 if tc is None else 3 + average)
  else:
    per_device = tc.batch_size * mc.block_size // (microbatches * devices)
    parts["--n_embd, --n_layer"] = params * (STATE_COPIES + average) * devices
    parts["--batch_size, --block_size, --microbatches"] = devices * activations(
        mc, per_device, backward=True)
  if tc is not None:
    windows = 2 * tc.eval_iters * tc.batch_size  # Train and val, gathered once.
    parts["--eval_iters, --batch_size"] = (2 * FLOAT_BYTES * windows * mc.block_size
                             + activations(mc, eval_chunk_tokens, backward=False))
  return parts


def check(mc: ModelConfig, sample: SampleConfig, tc: TrainConfig | None = None, *,
          train_devices=(), eval_platform: str = "cpu", microbatches: int = 1,
          eval_chunk_tokens: int = 0) -> None:
  """Refuses a run whose estimate exceeds this machine's physical memory: training on this
  process's `train_devices` (none: sampling alone), estimating losses on `eval_platform`."""
  on_cpu = not train_devices or train_devices[0].platform == "cpu"
  parts = estimate(mc, sample, tc, devices=len(train_devices) if on_cpu else 0,
                   microbatches=microbatches, on_cpu=on_cpu,
                   eval_chunk_tokens=eval_chunk_tokens if eval_platform == "cpu" else 0,
                   baseline_bytes=memory.resident_bytes())
  needed, available = sum(parts.values()), physical_memory()
  if needed > available:
    largest = max((p for p in parts if p.startswith("--")), key=parts.get)
    raise UserError(f"This run needs about {needed / 2**30:,.1f} GiB of memory, more than "
                    f"this machine's {available / 2**30:,.1f} GiB of physical memory; most "
                    f"of it for {largest}. Make those smaller.")
