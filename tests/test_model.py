import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randygpt import model
from randygpt.config import ModelConfig

from conftest import unjitted

CONFIG = ModelConfig(vocab_size=11, n_embd=32, n_head=4, n_layer=2, block_size=16, dropout=0.1)


@pytest.fixture(scope="module")
def params():
  return jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), CONFIG)


def tokens(batch=3, t=16, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, t), 0, CONFIG.vocab_size)


def test_default_shape_has_about_1_2m_params():
  config = ModelConfig(vocab_size=65)
  params = model.init_params(jax.random.key(0), config)
  assert sum(x.size for x in jax.tree.leaves(params)) == model.n_params(config) == 1_204_480


def test_init_std_scales_residual_projections(params):
  block = jax.tree.map(lambda stacked: stacked[0], params["blocks"])
  assert np.std(np.asarray(block["attn"]["wqkv"])) == pytest.approx(0.02, rel=0.1)
  assert np.std(np.asarray(block["mlp"]["w2"])) == pytest.approx(0.02 / 2, rel=0.1)


def test_blocks_are_stacked_by_layer_and_drawn_independently(params):
  wqkv_LxDx3D = np.asarray(params["blocks"]["attn"]["wqkv"])
  assert wqkv_LxDx3D.shape == (CONFIG.n_layer, CONFIG.n_embd, 3 * CONFIG.n_embd)
  assert not np.allclose(wqkv_LxDx3D[0], wqkv_LxDx3D[1])


@pytest.mark.parametrize("n_layer", [1, 3])
def test_number_of_weight_arrays_does_not_grow_with_depth(n_layer):
  # One array per kind of weight: the init and the optimizer compile once per kind.
  config = dataclasses.replace(CONFIG, n_layer=n_layer)
  shapes = jax.eval_shape(functools.partial(model.init_params, config=config), jax.random.key(0))
  assert len(jax.tree.leaves(shapes)) == 7


def test_forward_shape(params):
  assert model.forward(params, tokens(t=7), CONFIG).shape == (3, 7, CONFIG.vocab_size)


# The numbers of the forward pass, the loss and its gradient, with each lever and with
# dropout, are checked against the float64 reference in test_reference.py. What is left here
# of comparing jitted with unjitted (conftest.unjitted: every scan a Python loop, op by op) is
# one smoke test of the unjitted path at the smallest shape, with every lever and dropout:
# a tracing difference (e.g. masks drawn differently under jit) would show in it.
SMOKE = ModelConfig(vocab_size=7, n_embd=8, n_head=2, n_layer=2, block_size=4, dropout=0.5,
                    position="rope", qk_norm=True, final_norm=True)


def test_forward_with_dropout_jitted_matches_unjitted_smoke(monkeypatch):
  params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), SMOKE)
  x, rng = jax.random.randint(jax.random.key(1), (2, 4), 0, 7), jax.random.key(2)
  jitted = jax.jit(model.forward, static_argnames=("config", "train"))(
      params, x, SMOKE, train=True, rng=rng)
  norms, rmsnorm = [], model.rmsnorm
  monkeypatch.setattr(model, "rmsnorm", lambda x: norms.append(1) or rmsnorm(x))
  eager = unjitted(model.forward)(params, x, SMOKE, train=True, rng=rng)
  # The layer loop ran in Python: each block's four norms (two, and qk_norm's two) per
  # layer, and the final one. A traced scan would have called them once.
  assert len(norms) == 4 * SMOKE.n_layer + 1
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jitted, model.forward(params, x, SMOKE), rtol=1e-5, atol=1e-6)


def test_initial_loss_is_near_uniform(params):
  loss = model.loss_fn(params, (tokens(), tokens(seed=3)), CONFIG)
  assert abs(float(loss) - np.log(CONFIG.vocab_size)) < 0.1


def test_causal_logits_do_not_depend_on_later_tokens(params):
  t = 5
  # Tokens are integers: differentiate with respect to the position embeddings instead.
  x_1xT = tokens(batch=1)
  def logits_from_embedding_noise(noise_TxD):
    p = dict(params, wpe=params["wpe"] + noise_TxD)
    return model.forward(p, x_1xT, CONFIG)[0, t]
  jac_VxTxD = jax.jacobian(logits_from_embedding_noise)(jnp.zeros_like(params["wpe"]))
  assert np.abs(np.asarray(jac_VxTxD[:, t + 1:])).max() == 0.0
  assert np.abs(np.asarray(jac_VxTxD[:, :t + 1])).max() > 0.0
  # And changing a later token leaves earlier logits untouched.
  changed = x_1xT.at[0, t + 1:].set((x_1xT[0, t + 1:] + 1) % CONFIG.vocab_size)
  np.testing.assert_array_equal(model.forward(params, x_1xT, CONFIG)[0, :t + 1],
                                model.forward(params, changed, CONFIG)[0, :t + 1])


def test_dropout_only_in_training(params):
  x = tokens()
  eval_a = model.forward(params, x, CONFIG, train=False, rng=jax.random.key(1))
  eval_b = model.forward(params, x, CONFIG)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model.forward(params, x, CONFIG, train=True, rng=jax.random.key(1))
  train_b = model.forward(params, x, CONFIG, train=True, rng=jax.random.key(2))
  assert not np.allclose(train_a, train_b)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_masks_keep_the_rate_independently_of_the_split(rate):
  """The hashed masks: each element kept with probability 1 - rate, rows and layers
  uncorrelated, and a row's masks the same whichever rows are drawn beside it."""
  config = ModelConfig(vocab_size=11, n_embd=64, n_head=4, n_layer=3, block_size=32,
                       dropout=rate)
  rows_B = jnp.arange(40, 56)
  keep_Lx2xNxD = np.asarray(model.dropout_masks(jax.random.key(3), rows_B, config, 32))
  n_masks = 3 * 2 * 16
  sigma = np.sqrt(rate * (1 - rate) / keep_Lx2xNxD.size)
  assert abs(keep_Lx2xNxD.mean() - (1 - rate)) < 4 * sigma
  # Each (layer, site, row) mask against every other: correlations as for independent draws.
  masks = keep_Lx2xNxD.reshape(n_masks, 32 * 64).astype(np.float64)
  corr = np.corrcoef(masks)[np.triu_indices(n_masks, 1)]
  assert np.abs(corr).max() < 6 / np.sqrt(32 * 64)
  assert abs(corr.mean()) < 6 / np.sqrt(32 * 64 * corr.size)
  half = np.asarray(model.dropout_masks(jax.random.key(3), rows_B[8:], config, 32))
  np.testing.assert_array_equal(half, keep_Lx2xNxD.reshape(3, 2, 16, -1)[:, :, 8:].reshape(
      3, 2, -1, 64))
  other_step = np.asarray(model.dropout_masks(jax.random.key(4), rows_B, config, 32))
  assert (other_step != keep_Lx2xNxD).mean() > 0.5 * 2 * rate * (1 - rate)


def test_training_with_dropout_needs_rng(params):
  with pytest.raises(ValueError, match="rng"):
    model.forward(params, tokens(), CONFIG, train=True)


def test_rmsnorm_has_unit_rms():
  x = jax.random.normal(jax.random.key(0), (4, 32)) * 7.0
  rms = jnp.sqrt(jnp.mean(model.rmsnorm(x) ** 2, axis=-1))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-4)


def test_flops_per_token_of_the_default_shape():
  # 6 x (6 blocks x 12 x 128^2 + 128 x 65 weights) + 12 x 6 x 64 x 128 = 7.72 MFLOP.
  assert model.train_flops_per_token(ModelConfig(vocab_size=65)) == 7_717_632


# How the model computes (compute_dtype, attention): docs/accelerators.md, "NVIDIA GPUs".
def _variant(**values) -> ModelConfig:
  return dataclasses.replace(CONFIG, **values)


def _loss_and_grads(config, params, batch):
  return jax.value_and_grad(model.loss_fn)(params, batch, config)


def _batch(t=16):
  inputs_BxT = tokens(t=t)
  return inputs_BxT, jnp.roll(inputs_BxT, -1, axis=1)


def test_xla_attention_computes_the_einsum_attention(params):
  """Both the loss and the gradients, in float32 (jax.nn.dot_product_attention's XLA
  implementation: cuDNN's needs an NVIDIA GPU)."""
  batch = _batch()
  loss, grads = _loss_and_grads(_variant(attention="einsum"), params, batch)
  fused_loss, fused_grads = _loss_and_grads(_variant(attention="xla"), params, batch)
  np.testing.assert_allclose(fused_loss, loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_bfloat16_compute_keeps_float32_weights_gradients_and_loss(params, attention):
  """bfloat16 matmuls give about the float32 loss; the loss, the logits and the gradients
  stay float32 (the optimizer's state is float32 whatever the compute)."""
  batch = _batch()
  config = _variant(compute_dtype="bfloat16", attention=attention)
  loss, grads = _loss_and_grads(config, params, batch)
  want, _ = _loss_and_grads(CONFIG, params, batch)
  assert loss.dtype == jnp.float32 and abs(float(loss) - float(want)) < 2e-2
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  assert model.forward(params, batch[0], config).dtype == jnp.float32
  assert model.loss_fn(params, batch, config) != model.loss_fn(params, batch, CONFIG)


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_bfloat16_forward_with_dropout_jitted_matches_unjitted(params, attention):
  config = _variant(compute_dtype="bfloat16", attention=attention)
  batch, rng = _batch(), jax.random.key(3)
  run = functools.partial(model.loss_fn, config=config, train=True, rng=rng)
  np.testing.assert_allclose(jax.jit(run)(params, batch), unjitted(run)(params, batch),
                             rtol=1e-2)


def test_bfloat16_generation_fills_its_cache_in_bfloat16(params):
  config = _variant(compute_dtype="bfloat16")
  cache = model.init_cache(config, 2)
  logits, cache = model.forward_cached(params, tokens(batch=2, t=4), cache, 0, config)
  assert cache["k"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, model.forward(params, tokens(batch=2, t=4), config),
                             atol=5e-2)


@pytest.mark.parametrize("platform, expected", [("cpu", "xla"), ("METAL", "xla"),
                                                ("gpu", "cudnn"), ("cuda", "cudnn")])
def test_cudnn_attention_runs_as_xla_off_an_nvidia_gpu(platform, expected):
  assert model.on_platform(_variant(attention="cudnn"), platform).attention == expected
  assert model.on_platform(_variant(attention="einsum"), platform).attention == "einsum"
