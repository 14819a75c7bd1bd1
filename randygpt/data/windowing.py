"""The 90/10 split and the windows of a (seed, step): their starts drawn with JAX, their
tokens gathered on the host (the research core; it imports nothing from the runtime)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from randygpt.data.token_file import TokenFile
from randygpt.errors import UserError

VAL_FRACTION = 0.1
_INT32_MAX = 2**31 - 1


def min_text_length(block_size: int) -> int:
  """Shortest text whose 90/10 split leaves at least one window of block_size+1 on each side."""
  return int(np.ceil((block_size + 1) / VAL_FRACTION))


def train_length(n: int) -> int:
  """The first 90% of a text of `n` characters (or tokens): the training split."""
  return int(n * (1 - VAL_FRACTION))


def split(tokens: np.ndarray, block_size: int,
          n_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The training tokens and the validation tokens (views, not copies): the first 90% and the
  last 10%, or the first `n_train` tokens and the rest (the tokens of a text split by its
  characters, docs/data.md)."""
  if n_train is None and len(tokens) < min_text_length(block_size):
    raise UserError(
        f"The text is too short: {len(tokens):,} characters, but block_size={block_size} needs "
        f"at least {min_text_length(block_size):,} so that the 90/10 split leaves a window of "
        f"{block_size + 1} characters for validation. Use more text or a smaller --block_size.")
  n_train = train_length(len(tokens)) if n_train is None else n_train
  if min(n_train, len(tokens) - n_train) <= block_size:
    raise UserError(
        f"The text is too short: its splits have {n_train:,} and {len(tokens) - n_train:,} "
        f"tokens, but block_size={block_size} needs {block_size + 1} in each. Use more text, "
        "a smaller --block_size or a smaller --bpe_vocab_size.")
  return tokens[:n_train], tokens[n_train:]


def bits_per_character(loss: float, tokens: int, chars: int) -> float:
  """A loss in nats per token as bits per character of the text those tokens encode: the
  measure that compares runs with different tokenizers."""
  return loss * (tokens / chars) / math.log(2)


def _draw(key: jax.Array, n: int, high: int) -> jax.Array:
  """`n` uniform draws from [0, high) as JAX makes them: `randint` where int32 holds `high`,
  else two 32-bit words each (which `_starts` joins)."""
  if high <= _INT32_MAX:
    return jax.random.randint(key, (n,), 0, high)
  return jax.random.bits(key, (2, n), jnp.uint32)


def _starts(drawn, high: int) -> np.ndarray:
  drawn = np.asarray(drawn)
  if high <= _INT32_MAX:
    return drawn.astype(np.int64)
  words = drawn.astype(np.uint64)
  joined = words[..., 0, :] << np.uint64(32) | words[..., 1, :]
  return (joined % np.uint64(high)).astype(np.int64)


def window_starts(key: jax.Array, n: int, n_tokens: int, block_size: int) -> np.ndarray:
  """`n` window starts drawn uniformly from the text's n_tokens - block_size positions."""
  high = n_tokens - block_size
  return _starts(_draw(key, n, high), high)


def windows(tokens, starts_B: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The windows at `starts_B`, read from `tokens` (a TokenFile or any array): inputs and
  their next-character targets, each (B, T) int32."""
  if isinstance(tokens, TokenFile):
    windows_BxT1 = tokens.windows(starts_B, block_size + 1)
  else:
    windows_BxT1 = tokens[starts_B[:, None] + np.arange(block_size + 1)]
  windows_BxT1 = np.asarray(windows_BxT1, np.int32)
  return windows_BxT1[:, :-1], windows_BxT1[:, 1:]


def get_batch(tokens, key: jax.Array, batch_size: int, block_size: int):
  """`batch_size` random windows of `tokens` for `key`: inputs and targets, each (B, T)."""
  return windows(tokens, window_starts(key, batch_size, len(tokens), block_size), block_size)


def _compile(jitted, *args):
  """JAX's own compiling: what `compile_kept` does when no lowering is kept."""
  return jitted.lower(*args).compile()


class WindowSampler:
  """The training windows of each step: their starts are a pure function of (key, step),
  drawn `steps_ahead` steps at a time in one JAX call, and gathered on the host. `compile`
  turns the jitted draw and an example argument into the function called: a run passes
  `runtime.exported.compile_kept`, which keeps its lowering between runs."""

  def __init__(self, tokens, key: jax.Array, batch_size: int, block_size: int,
               steps_ahead: int = 64, compile=None):
    self.tokens, self.block_size, self.steps_ahead = tokens, block_size, steps_ahead
    self._high = len(tokens) - block_size
    draw_one = lambda step: _draw(jax.random.fold_in(key, step), batch_size, self._high)
    self._draw_many = jax.jit(jax.vmap(draw_one))
    self._compile = compile or _compile
    self._compiled = None  # Compiled at the first draw.
    self._first, self._starts = None, None

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    first = step - step % self.steps_ahead
    if first != self._first:
      # Drawn on the CPU whatever the default device (a GPU that trains): the starts are read
      # on the host.
      steps = jax.device_put(np.arange(first, first + self.steps_ahead, dtype=np.uint32),
                             jax.local_devices(backend="cpu")[0])
      if self._compiled is None:
        self._compiled = self._compile(self._draw_many, steps)
      self._first, self._starts = first, _starts(self._compiled(steps), self._high)
    return windows(self.tokens, self._starts[step - first], self.block_size)
