import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from randygpt import model, optim
from randygpt.config import ModelConfig, TrainConfig

TRAIN = TrainConfig(learning_rate=1e-2, min_lr=1e-3, warmup_iters=10, weight_decay=0.5)


def test_schedule_warms_up_decays_and_holds():
  lr = optim.lr_schedule(dataclasses.replace(TRAIN, lr_decay_iters=100))
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(5e-3)
  assert float(lr(10)) == pytest.approx(1e-2)
  assert float(lr(55)) == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3), rel=1e-5)  # Half-way.
  assert float(lr(100)) == pytest.approx(1e-3)
  assert float(lr(5000)) == pytest.approx(1e-3)
  values = [float(lr(s)) for s in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_with_horizon_shorter_than_warmup_is_valid():
  lr = optim.lr_schedule(dataclasses.replace(TRAIN, lr_decay_iters=5))
  assert np.isfinite([float(lr(s)) for s in range(20)]).all()
  assert float(lr(19)) == pytest.approx(1e-3)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
  tc = dataclasses.replace(TRAIN, lr_schedule="wsd", decay_fraction=0.25, lr_decay_iters=100)
  lr = optim.lr_schedule(tc)
  assert optim.decay_start(tc) == 75
  assert float(lr(5)) == pytest.approx(5e-3)  # The warmup is cosine's.
  assert [float(lr(s)) for s in (10, 40, 75)] == [pytest.approx(1e-2)] * 3
  assert float(lr(80)) == pytest.approx(1e-2 - 5 / 25 * (1e-2 - 1e-3))
  assert float(lr(100)) == pytest.approx(1e-3) and float(lr(5000)) == pytest.approx(1e-3)
  # The default stays cosine: at 40 the cosine has come down, wsd has not.
  assert float(optim.lr_schedule(dataclasses.replace(tc, lr_schedule="cosine"))(40)) < 9e-3


def init_params(config):
  """model.init_params in one compiled program (eager, each of its operations compiles)."""
  return jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), config)


def test_decay_mask_skips_embeddings_only():
  params = init_params(ModelConfig(vocab_size=7, n_embd=8, n_head=2, n_layer=2, block_size=4))
  mask = optim.decay_mask(params)
  assert mask["wte"] is False and mask["wpe"] is False
  assert mask["lm_head"] is True
  assert all(jax.tree.leaves(mask["blocks"]))


def test_weight_decay_shrinks_matrices_but_not_embeddings():
  params = init_params(ModelConfig(vocab_size=7, n_embd=8, n_head=2, n_layer=1, block_size=4))
  opt = optim.make_optimizer(TRAIN)
  state = jax.jit(opt.init)(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(opt.update)
  for _ in range(20):  # Past the warmup, so the learning rate is not zero.
    updates, state = update(zero_grads, state, params)
    params_next = jax.jit(optax.apply_updates)(params, updates)
  np.testing.assert_array_equal(params_next["wte"], params["wte"])
  np.testing.assert_array_equal(params_next["wpe"], params["wpe"])
  assert float(jnp.abs(params_next["lm_head"]).sum()) < float(jnp.abs(params["lm_head"]).sum())

