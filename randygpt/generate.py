"""Sampling: temperature, top-k and top-p filtering, and jitted autoregressive generation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from randygpt import model
from randygpt.config import ModelConfig, SampleConfig

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


@functools.partial(jax.jit, static_argnames=("model_config", "sample_config"))
def generate(params, prompt_P: jax.Array, key: jax.Array, model_config: ModelConfig,
             sample_config: SampleConfig) -> jax.Array:
  """`max_new_tokens` tokens following `prompt_P`, the context cropped to the last block_size."""
  n_prompt, n_new, block = prompt_P.shape[0], sample_config.max_new_tokens, model_config.block_size
  buffer_L = jnp.zeros(max(n_prompt + n_new, block), jnp.int32).at[:n_prompt].set(prompt_P)

  def step(i, buffer_L):
    pos = n_prompt + i  # Tokens known so far; the next one goes here.
    start = jnp.maximum(pos - block, 0)
    # Causal attention: positions after `pos` in the window cannot affect its logits.
    window_1xT = jax.lax.dynamic_slice(buffer_L, (start,), (block,))[None]
    logits_V = model.forward(params, window_1xT, model_config)[0, pos - 1 - start]
    logits_1xV = filter_logits(logits_V[None], sample_config.temperature, sample_config.top_k,
                               sample_config.top_p)
    token = jax.random.categorical(jax.random.fold_in(key, i), logits_1xV)[0]
    return buffer_L.at[pos].set(token)

  buffer_L = jax.lax.fori_loop(0, n_new, step, buffer_L)
  return buffer_L[n_prompt:n_prompt + n_new]


def complete(params, tokenizer, prompt: str, key: jax.Array, model_config: ModelConfig,
             sample_config: SampleConfig) -> str:
  """The prompt's continuation as text."""
  prompt_P = jnp.asarray(tokenizer.encode(prompt))
  return tokenizer.decode(np.asarray(generate(params, prompt_P, key, model_config, sample_config)))


def write_samples(params, tokenizer, prompts, seed: int, model_config: ModelConfig,
                  sample_config: SampleConfig, path=None, stop=None) -> None:
  """Prints each prompt with its continuation (and writes them to `path`); stops early
  between prompts when `stop.signum` is set."""
  print("Generating samples...", flush=True)
  key = jax.random.fold_in(jax.random.key(seed), SAMPLE_STREAM)
  texts = []
  for i, prompt in enumerate(prompts):
    if stop is not None and stop.signum:
      break
    texts.append(prompt + complete(params, tokenizer, prompt, jax.random.fold_in(key, i),
                                   model_config, sample_config))
    print(f"\n{texts[-1]}\n", flush=True)
  if path is not None:
    path.write_text("".join(t + "\n\n" for t in texts), encoding="utf-8")
