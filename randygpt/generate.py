"""Sampling: temperature, top-k and top-p filtering, and jitted autoregressive generation."""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from randygpt import data, model
from randygpt.config import ModelConfig, SampleConfig
from randygpt.errors import UserError

# Sampling keys derive from the seed with this stream id (training uses 0-3), so sampling
# from a checkpoint with the run's seed reproduces the run's samples.
SAMPLE_STREAM = 4


def filter_logits(logits_BxV: jax.Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Scaled logits with every token outside the top-k / top-p (nucleus) set at -inf."""
  logits_BxV = logits_BxV / temperature
  if 0 < top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][..., -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the probability mass before it is below top_p: the smallest
    # set whose mass reaches top_p, and never empty.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf)
    threshold_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def _draw(logits_BxV: jax.Array, key: jax.Array, config: SampleConfig) -> jax.Array:
  if config.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  # Shifted to a maximum of 0: a tiny temperature then gives -inf, never inf - inf (NaN).
  logits_BxV = logits_BxV - logits_BxV.max(axis=-1, keepdims=True)
  logits_BxV = filter_logits(logits_BxV, config.temperature, config.top_k, config.top_p)
  return jax.random.categorical(key, logits_BxV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model_config", "sample_config", "use_cache"))
def generate(params, prompt_BxP: jax.Array, key: jax.Array, model_config: ModelConfig,
             sample_config: SampleConfig, use_cache: bool = True) -> jax.Array:
  """`max_new_tokens` tokens following each row of `prompt_BxP` (P >= 1), in one jitted loop.

  While the text fits the context window, a key/value cache makes each new token cost one
  position (the prompt is prefilled at once). Beyond it, each token re-runs the last
  block_size tokens, as nanoGPT does; with rotary positions and `rolling_cache`, the cache
  rolls on instead (one position per token, each keeping the keys and values computed when
  it was added: not what re-running the window computes, docs/levers.md). `use_cache=False`
  re-runs the window for every token: the reference the cached path must match.
  """
  batch, n_prompt = prompt_BxP.shape
  n_new, block = sample_config.max_new_tokens, model_config.block_size
  rolling = sample_config.rolling_cache and model_config.position == "rope"
  n_cached = (0 if not use_cache or n_prompt > block else
              n_new if rolling else min(n_new, block - n_prompt + 1))
  buffer_BxM = jnp.zeros((batch, max(n_prompt + n_new, block)), jnp.int32)
  buffer_BxM = buffer_BxM.at[:, :n_prompt].set(prompt_BxP)

  def draw(logits_BxV, i):
    return _draw(logits_BxV, jax.random.fold_in(key, i), sample_config)

  if n_cached:
    cache = model.init_cache(model_config, batch)
    logits_BxPxV, cache = model.forward_cached(params, prompt_BxP, cache, 0, model_config)

    def decode(carry, i):
      cache, token_B = carry
      logits_Bx1xV, cache = model.forward_cached(params, token_B[:, None], cache,
                                                 n_prompt + i - 1, model_config)
      token_B = draw(logits_Bx1xV[:, 0], i)
      return (cache, token_B), token_B

    first_B = draw(logits_BxPxV[:, -1], 0)
    _, rest_GxB = jax.lax.scan(decode, (cache, first_B), jnp.arange(1, n_cached))
    cached_BxG = jnp.concatenate([first_B[:, None], rest_GxB.T], axis=1)
    buffer_BxM = buffer_BxM.at[:, n_prompt:n_prompt + n_cached].set(cached_BxG)

  def window_step(i, buffer_BxM):
    pos = n_prompt + i  # Tokens known so far; the next one goes here.
    start = jnp.maximum(pos - block, 0)
    # Causal attention: positions after `pos` in the window cannot affect its logits.
    window_BxT = jax.lax.dynamic_slice_in_dim(buffer_BxM, start, block, axis=1)
    logits_BxV = model.forward(params, window_BxT, model_config)[:, pos - 1 - start]
    return buffer_BxM.at[:, pos].set(draw(logits_BxV, i))

  buffer_BxM = jax.lax.fori_loop(n_cached, n_new, window_step, buffer_BxM)
  return buffer_BxM[:, n_prompt:n_prompt + n_new]


def check_prompts(prompts, tokenizer: data.CharTokenizer, default_prompts=SampleConfig.prompt):
  """Prompts the vocabulary can encode: a user's prompt that cannot is an error; a
  default that cannot falls back to a newline (or the vocabulary's first character)."""
  start = "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
  checked = []
  for prompt in prompts:
    missing = tokenizer.missing(prompt)
    if missing and tuple(prompts) == tuple(default_prompts):
      print(f"Note: the default prompt {prompt!r} has characters outside this data's "
            f"vocabulary; samples start from {start!r} instead.")
      prompt = start
    elif missing:
      raise UserError(f"--prompt={prompt!r} has characters that are not in the training "
                      f"text's vocabulary: {' '.join(repr(c) for c in missing)}.")
    checked.append(prompt or start)
  return tuple(checked)


def complete(params, tokenizer, prompt: str, key: jax.Array, model_config: ModelConfig,
             sample_config: SampleConfig) -> list[str]:
  """`num_samples` continuations of the prompt, drawn as one batch."""
  prompt_BxP = np.tile(tokenizer.encode(prompt), (sample_config.num_samples, 1))
  tokens_BxG = generate(params, prompt_BxP, key, model_config, sample_config)
  return [tokenizer.decode(row) for row in np.asarray(tokens_BxG)]


def write_samples(complete: Callable[[str, jax.Array], list[str]], prompts, seed: int,
                  path=None, stop=None) -> None:
  """Prints each prompt with its continuations, `complete(prompt, key)` (and writes them to
  `path`); stops early between prompts when `stop.signum` is set."""
  print("Generating samples...", flush=True)
  key = jax.random.fold_in(jax.random.key(seed), SAMPLE_STREAM)
  texts = []
  for i, prompt in enumerate(prompts):
    if stop is not None and stop.signum:
      break
    for continuation in complete(prompt, jax.random.fold_in(key, i)):
      texts.append(prompt + continuation)
      print(f"\n{texts[-1]}\n", flush=True)
  if path is not None:
    path.write_text("".join(t + "\n\n" for t in texts), encoding="utf-8")
