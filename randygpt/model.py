"""randyGPT's architecture as pure functions over a pytree of parameters.

Pre-norm blocks with gain-free RMSNorm, causal multi-head attention, a squared-ReLU
MLP of width 4*n_embd, no biases, learned token and position embeddings and an
untied lm_head applied to the last residual stream (randyGPT has no final norm).

Activations are kept as 2-D (B*T, D) matrices around every projection: XLA's CPU
backend runs those matmuls about 1.7x faster than the 3-D (B, T, D) equivalents.
"""

import math

import jax
import jax.numpy as jnp
import optax

from randygpt.config import ModelConfig

RMS_EPS = 1e-5
INIT_STD = 0.02


def init_params(key: jax.Array, config: ModelConfig) -> dict:
  """GPT-2 style init: N(0, 0.02); residual projections scaled by 1/sqrt(2*n_layer)."""
  d, v = config.n_embd, config.vocab_size
  residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
  keys = iter(jax.random.split(key, 3 + 4 * config.n_layer))

  def normal(shape, std=INIT_STD):
    return std * jax.random.normal(next(keys), shape, jnp.float32)

  params = {
      "wte": normal((v, d)),
      "wpe": normal((config.block_size, d)),
      "lm_head": normal((d, v)),
      "blocks": [],
  }
  for _ in range(config.n_layer):
    params["blocks"].append({
        "attn": {"wqkv": normal((d, 3 * d)), "wo": normal((d, d), residual_std)},
        "mlp": {"w1": normal((d, 4 * d)), "w2": normal((4 * d, d), residual_std)},
    })
  return params


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def rmsnorm(x_NxD: jax.Array) -> jax.Array:
  return x_NxD * jax.lax.rsqrt(jnp.mean(x_NxD * x_NxD, axis=-1, keepdims=True) + RMS_EPS)


def _dropout(x, rate, rng):
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _attention(attn, x_NxD, batch, config: ModelConfig):
  n, d = x_NxD.shape
  t, h, k = n // batch, config.n_head, config.head_dim
  qkv_NxC = x_NxD @ attn["wqkv"]
  q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_NxC.reshape(batch, t, 3 * h, k), 3, axis=2)
  scores_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxTxHxK) / math.sqrt(k)
  causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
  scores_BxHxTxT = jnp.where(causal_TxT, scores_BxHxTxT, -jnp.inf)
  probs_BxHxTxT = jax.nn.softmax(scores_BxHxTxT, axis=-1)
  out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxT, v_BxTxHxK)
  return out_BxTxHxK.reshape(n, d) @ attn["wo"]


def _mlp(mlp, x_NxD):
  return jnp.square(jax.nn.relu(x_NxD @ mlp["w1"])) @ mlp["w2"]


def forward(params, tokens_BxT: jax.Array, config: ModelConfig, *, train: bool = False,
            rng: jax.Array | None = None) -> jax.Array:
  """Logits (B, T, vocab) for each position; dropout only when `train` and `rng` is given."""
  batch, t = tokens_BxT.shape
  use_dropout = train and config.dropout > 0.0
  if use_dropout and rng is None:
    raise ValueError("forward(train=True) with dropout needs an rng")
  keys = list(jax.random.split(rng, 2 * config.n_layer)) if use_dropout else None

  def drop(x):
    return _dropout(x, config.dropout, keys.pop()) if use_dropout else x

  x_BxTxD = params["wte"][tokens_BxT] + params["wpe"][:t]
  x_NxD = x_BxTxD.reshape(batch * t, config.n_embd)
  for block in params["blocks"]:
    x_NxD = x_NxD + drop(_attention(block["attn"], rmsnorm(x_NxD), batch, config))
    x_NxD = x_NxD + drop(_mlp(block["mlp"], rmsnorm(x_NxD)))
  logits_NxV = x_NxD @ params["lm_head"]
  return logits_NxV.reshape(batch, t, config.vocab_size)


def loss_fn(params, batch, config: ModelConfig, *, train: bool = False,
            rng: jax.Array | None = None) -> jax.Array:
  """Mean next-character cross-entropy of `batch = (inputs_BxT, targets_BxT)`."""
  inputs_BxT, targets_BxT = batch
  logits_BxTxV = forward(params, inputs_BxT, config, train=train, rng=rng)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()
