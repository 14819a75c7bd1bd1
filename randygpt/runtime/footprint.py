"""A rough estimate of the memory a run needs, checked before anything is allocated: a
shape the machine cannot hold gets an error naming the flags, not an allocation failure."""

import os

from randygpt import model
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt.errors import UserError

FLOAT_BYTES = 4
# Floats kept per parameter while training: weights, gradients, two Adam moments, and the
# new weights before the donated old ones are freed.
STATE_COPIES = 5
# Floats per token and layer kept for the backward pass (q, k, v, attention output, the
# 4x MLP twice, norms, residuals), with the attention scores on top.
ACTIVATIONS_PER_EMBD = 16
# Bytes per evaluation window start while its random bits are drawn (all at once).
EVAL_BYTES_PER_WINDOW = 32


def physical_memory() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def human_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
    n /= 1000


def estimate(mc: ModelConfig, sample: SampleConfig, tc: TrainConfig | None = None) -> dict:
  """Bytes by what needs them, keyed by the flags that set them (training needs `tc`)."""
  per_sample = (sample.max_new_tokens + mc.block_size  # The token buffer.
                + 2 * mc.n_layer * mc.block_size * mc.n_embd  # The key/value cache.
                + 4 * mc.vocab_size)  # Logits while drawing.
  parts = {"--n_embd, --n_layer": FLOAT_BYTES * model.n_params(mc) * (STATE_COPIES if tc else 1),
           "--num_samples, --max_new_tokens": FLOAT_BYTES * sample.num_samples * per_sample}
  if tc:
    per_token = (mc.n_layer * (ACTIVATIONS_PER_EMBD * mc.n_embd + 2 * mc.n_head * mc.block_size)
                 + 3 * mc.vocab_size)
    parts["--batch_size, --block_size"] = (FLOAT_BYTES * tc.batch_size * mc.block_size
                                           * per_token)
    parts["--eval_iters"] = EVAL_BYTES_PER_WINDOW * tc.eval_iters * tc.batch_size
  return parts


def check(mc: ModelConfig, sample: SampleConfig, tc: TrainConfig | None = None) -> None:
  """Refuses a run whose estimate exceeds this machine's physical memory."""
  parts = estimate(mc, sample, tc)
  needed, available = sum(parts.values()), physical_memory()
  if needed > available:
    largest = max(parts, key=parts.get)
    raise UserError(f"This run needs about {needed / 2**30:,.1f} GiB of memory, more than "
                    f"this machine's {available / 2**30:,.1f} GiB; most of it for "
                    f"{largest}. Make those smaller.")
