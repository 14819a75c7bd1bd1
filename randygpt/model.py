"""randyGPT's architecture as pure functions over a pytree of parameters.

Pre-norm blocks with gain-free RMSNorm, causal multi-head attention, a squared-ReLU
MLP of width 4*n_embd, no biases, learned token and position embeddings and an
untied lm_head applied to the last residual stream (randyGPT has no final norm).

Four levers change the architecture, each off by default (docs/levers.md):
`position="rope"` rotates each head's query and key by its absolute position (rotary
embeddings, so attention sees relative positions) and drops the learned `wpe`; `qk_norm`
RMS-normalises each head's query and key, gain-free; `final_norm` RMS-normalises the last
residual stream before the lm_head, gain-free; `logit_softcap` bounds the logits to (-cap,
cap) with a tanh. None of them adds a parameter. `zero_init` changes the init only.

Two settings change how, not what, the model computes (docs/accelerators.md):
`compute_dtype="bfloat16"` runs every matmul in bfloat16 on float32 weights cast at their
use, while the residual stream, norms, softmaxes and logits stay float32 (as PyTorch's
autocast does); `attention="cudnn"` (or `"xla"`) hands the window's causal attention to
`jax.nn.dot_product_attention` (cuDNN's fused kernel on an NVIDIA GPU). Their defaults
compute exactly the float32 graph written here.

Names carry their shapes (`logits_BxTxV`), in letters that mean the same in every file:
  B  sequences in a batch          T  positions in a window (at most block_size)
  S  positions attended over       D  n_embd
  H  heads                         K  head_dim = D / H
  C  3·D: the fused q, k, v        F  4·D: the MLP's width
  V  vocabulary                    L  layers
  N  tokens of a batch, B·T        P  prompt length
  G  generated tokens              M  a sample's whole buffer (prompt, generated)

Activations are kept as 2-D (N, D) matrices around every projection: XLA's CPU backend
runs those matmuls about 1.7x faster than the 3-D (B, T, D) equivalents. The blocks'
weights are stacked along a leading L axis, so that the init and the optimizer compile
once per kind of weight rather than once per layer: the compiled train step then holds
half the memory (docs/measurements.md, "Memory").
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from randygpt.config import ModelConfig

RMS_EPS = 1e-5
CUDNN_PLATFORMS = ("gpu", "cuda")  # JAX's names of an NVIDIA GPU's devices and backend.
INIT_STD = 0.02
ROPE_BASE = 10000.0  # The rotary frequencies' base, as in RoFormer and Llama.


def init_params(key: jax.Array, config: ModelConfig) -> dict:
  """GPT-2 style init: N(0, 0.02); residual projections scaled by 1/sqrt(2*n_layer)."""
  d, v = config.n_embd, config.vocab_size
  residual_std = INIT_STD / math.sqrt(2 * config.n_layer)

  def normal(key, shape, std=INIT_STD):
    return std * jax.random.normal(key, shape, jnp.float32)

  def block(key):
    k_qkv, k_o, k_1, k_2 = jax.random.split(key, 4)
    return {"attn": {"wqkv": normal(k_qkv, (d, 3 * d)), "wo": normal(k_o, (d, d), residual_std)},
            "mlp": {"w1": normal(k_1, (d, 4 * d)), "w2": normal(k_2, (4 * d, d), residual_std)}}

  k_wte, k_wpe, k_head, k_blocks = jax.random.split(key, 4)
  params = {"wte": normal(k_wte, (v, d)), "wpe": normal(k_wpe, (config.block_size, d)),
            "lm_head": normal(k_head, (d, v)),
            "blocks": jax.vmap(block)(jax.random.split(k_blocks, config.n_layer))}
  if config.position == "rope":  # Same keys for the rest: only wpe differs from "learned".
    del params["wpe"]
  if config.zero_init:  # Each block starts as the identity, the logits uniform.
    params["lm_head"] = jnp.zeros_like(params["lm_head"])
    for part, name in (("attn", "wo"), ("mlp", "w2")):
      params["blocks"][part][name] = jnp.zeros_like(params["blocks"][part][name])
  return params


def n_params(config: ModelConfig) -> int:
  """The parameters of `init_params(key, config)`: per block 12·D² (attention 4, MLP 8),
  the token embeddings, the position embeddings (not with rope) and the lm_head."""
  d = config.n_embd
  positions = config.block_size if config.position == "learned" else 0
  return 12 * config.n_layer * d * d + (2 * config.vocab_size + positions) * d


def train_flops_per_token(config: ModelConfig) -> int:
  """Model FLOPs of one token's forward and backward pass, as MFU counts them: 6 per
  weight of every matrix multiplied, plus 12 * n_layer * block_size * n_embd for the
  attention scores and their weighted sums."""
  d = config.n_embd
  matmul_weights = 12 * d * d * config.n_layer + d * config.vocab_size
  return 6 * matmul_weights + 12 * config.n_layer * config.block_size * d


def rmsnorm(x_NxD: jax.Array) -> jax.Array:
  """Gain-free RMSNorm, computed in float32 whatever the input's dtype."""
  x32_NxD = x_NxD.astype(jnp.float32)
  normed_NxD = x32_NxD * jax.lax.rsqrt(jnp.mean(x32_NxD * x32_NxD, axis=-1, keepdims=True)
                                       + RMS_EPS)
  return normed_NxD.astype(x_NxD.dtype)


def compute_dtype(config: ModelConfig):
  """The matmuls' dtype: bfloat16 when asked, else float32 (also for "auto", which the
  placement resolves before a run builds its step)."""
  return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


def on_platform(config: ModelConfig, platform: str) -> ModelConfig:
  """`config` as `platform` (a JAX platform name) runs it: cuDNN's attention exists on an
  NVIDIA GPU only; elsewhere XLA's implementation computes the same function."""
  if config.attention == "cudnn" and platform not in CUDNN_PLATFORMS:
    return dataclasses.replace(config, attention="xla")
  return config


def _dense(x, w, config: ModelConfig) -> jax.Array:
  """x @ w in the compute dtype (both already float32 on the default path: no casts)."""
  dtype = compute_dtype(config)
  return x.astype(dtype) @ w.astype(dtype)


def _dropout(x, rate, keep):
  return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0.0)


def init_cache(config: ModelConfig, batch: int) -> dict:
  """An empty key/value cache for `batch` sequences of block_size positions, each layer's
  stacked along a leading n_layer axis. Position p is stored at slot p mod block_size: up
  to block_size it is the window itself; past it (rope only) a ring of the last block_size
  positions."""
  shape = (config.n_layer, batch, config.block_size, config.n_head, config.head_dim)
  dtype = compute_dtype(config)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def rope(x_BxTxHxK: jax.Array, pos) -> jax.Array:
  """Rotary position embedding: each pair (i, i + K/2) of a head's features rotated by the
  angle (pos + t) / ROPE_BASE**(2i/K), t the row's index in the window."""
  half = x_BxTxHxK.shape[-1] // 2
  inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_TxK = (pos + jnp.arange(x_BxTxHxK.shape[1]))[:, None].astype(jnp.float32) * inv_freq
  cos, sin = jnp.cos(angle_TxK)[:, None, :], jnp.sin(angle_TxK)[:, None, :]
  x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxHxK.dtype)


def _attention(attn, x_NxD, batch, config: ModelConfig, cache, pos):
  """Causal attention of the T new positions pos..pos+T-1; with a cache, their keys and
  values are written into it at slot `pos` mod block_size and the queries attend over the
  cached positions up to their own (a ring past the window: T is then 1)."""
  n, d = x_NxD.shape
  t, h, k = n // batch, config.n_head, config.head_dim
  qkv_NxC = _dense(x_NxD, attn["wqkv"], config)
  q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_NxC.reshape(batch, t, 3 * h, k), 3, axis=2)
  if config.qk_norm:
    q_BxTxHxK, k_BxTxHxK = rmsnorm(q_BxTxHxK), rmsnorm(k_BxTxHxK)
  if config.position == "rope":
    q_BxTxHxK, k_BxTxHxK = rope(q_BxTxHxK, pos), rope(k_BxTxHxK, pos)
  if cache is not None:
    s = cache["k"].shape[1]
    slot = pos % s
    cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BxTxHxK, slot, axis=1),
             "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BxTxHxK, slot, axis=1)}
    k_BxSxHxK, v_BxSxHxK = cache["k"], cache["v"]
    # The position each slot holds after this write (negative: not written yet).
    last = pos + t - 1
    key_pos_S = last - (last - jnp.arange(s)) % s
  elif config.attention in ("xla", "cudnn"):  # The window attends to itself: a causal mask.
    out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True,
                                               implementation=config.attention)
    return _dense(out_BxTxHxK.reshape(n, d), attn["wo"], config), cache
  else:
    k_BxSxHxK, v_BxSxHxK = k_BxTxHxK, v_BxTxHxK
    key_pos_S = pos + jnp.arange(t)
  scores_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK) / math.sqrt(k)
  causal_TxS = ((key_pos_S[None, :] <= pos + jnp.arange(t)[:, None])
                & (key_pos_S[None, :] >= 0))
  scores_BxHxTxS = jnp.where(causal_TxS, scores_BxHxTxS.astype(jnp.float32), -jnp.inf)
  probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(v_BxSxHxK.dtype)
  out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS, v_BxSxHxK)
  return _dense(out_BxTxHxK.reshape(n, d), attn["wo"], config), cache


def _mlp(mlp, x_NxD, config: ModelConfig):
  return _dense(jnp.square(jax.nn.relu(_dense(x_NxD, mlp["w1"], config))), mlp["w2"], config)


def _transformer(params, tokens_BxT, config: ModelConfig, keep_Lx2xNxD, cache, pos):
  """The blocks as a `lax.scan` over their stacked weights, unrolled: a rolled loop ran the
  train step 15-30% slower on the CPU (docs/measurements.md, "Training speed")."""
  batch, t = tokens_BxT.shape
  x_BxTxD = params["wte"][tokens_BxT]
  if config.position == "learned":
    x_BxTxD = x_BxTxD + jax.lax.dynamic_slice_in_dim(params["wpe"], pos, t)

  def block(x_NxD, layer):
    weights, keep_2xNxD, layer_cache = layer
    attn_keep, mlp_keep = (None, None) if keep_2xNxD is None else keep_2xNxD
    attn_NxD, layer_cache = _attention(weights["attn"], rmsnorm(x_NxD), batch, config,
                                       layer_cache, pos)
    x_NxD = x_NxD + _dropout(attn_NxD, config.dropout, attn_keep)
    x_NxD = x_NxD + _dropout(_mlp(weights["mlp"], rmsnorm(x_NxD), config), config.dropout,
                             mlp_keep)
    return x_NxD, layer_cache

  x_NxD, new_cache = jax.lax.scan(block, x_BxTxD.reshape(batch * t, config.n_embd),
                                  (params["blocks"], keep_Lx2xNxD, cache), unroll=True)
  if config.final_norm:
    x_NxD = rmsnorm(x_NxD)
  logits_NxV = _dense(x_NxD, params["lm_head"], config).astype(jnp.float32)
  if config.logit_softcap:
    logits_NxV = config.logit_softcap * jnp.tanh(logits_NxV / config.logit_softcap)
  return logits_NxV.reshape(batch, t, config.vocab_size), new_cache


def _mix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~ 1/2."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def dropout_masks(rng: jax.Array, rows_B: jax.Array, config: ModelConfig,
                  t: int) -> jax.Array:
  """Which activations dropout keeps, (L, 2, B·T, D), as a pure function of (rng, global
  row, element): so the masks do not depend on how the batch is split into microbatches or
  over devices. Each row gets two 32-bit keys from `jax.random`; each element hashes its
  index with them. jax.random drawing every element cost 60-70 ms a step at the default
  shape, the hash 1 ms (docs/measurements.md, "Dropout masks")."""
  keys_2xB = jax.vmap(lambda row: jax.random.bits(jax.random.fold_in(rng, row), (2,),
                                                  jnp.uint32), out_axes=1)(rows_B)
  k1_Bx1x1, k2_Bx1x1 = keys_2xB[:, :, None, None]
  shape = (config.n_layer, 2, 1, t, config.n_embd)
  index_Lx2x1xTxD = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
  bits_Lx2xBxTxD = _mix32(_mix32(index_Lx2x1xTxD ^ k1_Bx1x1) ^ k2_Bx1x1)
  drop_below = jnp.uint32(min(round(config.dropout * 2**32), 2**32 - 1))
  return (bits_Lx2xBxTxD >= drop_below).reshape(config.n_layer, 2, -1, config.n_embd)


def forward(params, tokens_BxT: jax.Array, config: ModelConfig, *, train: bool = False,
            rng: jax.Array | None = None, rows_B: jax.Array | None = None) -> jax.Array:
  """Logits (B, T, vocab) for each position; dropout only when `train` and `rng` is given,
  its masks drawn per global row (`rows_B`, by default 0..B-1: the batch is whole)."""
  use_dropout = train and config.dropout > 0.0
  if use_dropout and rng is None:
    raise ValueError("forward(train=True) with dropout needs an rng")
  keep_Lx2xNxD = None
  if use_dropout:
    batch, t = tokens_BxT.shape
    rows_B = jnp.arange(batch) if rows_B is None else rows_B
    keep_Lx2xNxD = dropout_masks(rng, rows_B, config, t)
  return _transformer(params, tokens_BxT, config, keep_Lx2xNxD, None, 0)[0]


def forward_cached(params, tokens_BxT: jax.Array, cache: dict, pos: jax.Array,
                   config: ModelConfig) -> tuple[jax.Array, dict]:
  """Logits of T tokens at positions pos..pos+T-1 given the cache of the positions before
  them, and the cache with theirs added. No dropout. pos + T <= block_size, except with
  rope, where one token (T = 1) may go past the window: the cache then holds the last
  block_size positions, each with the keys and values computed when it was added."""
  return _transformer(params, tokens_BxT, config, None, cache, pos)


def loss_fn(params, batch, config: ModelConfig, *, train: bool = False,
            rng: jax.Array | None = None, rows_B: jax.Array | None = None) -> jax.Array:
  """Mean next-character cross-entropy of `batch = (inputs_BxT, targets_BxT)`."""
  inputs_BxT, targets_BxT = batch
  logits_BxTxV = forward(params, inputs_BxT, config, train=train, rng=rng, rows_B=rows_B)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()
