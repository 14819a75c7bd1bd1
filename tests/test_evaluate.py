import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randygpt import data, evaluate, model, train
from randygpt.config import ModelConfig, TrainConfig

from conftest import make_corpus, unjitted

CONFIG = ModelConfig(vocab_size=0, n_embd=16, n_head=2, n_layer=2, block_size=16)
LOSS_RTOL = 1e-5  # Jitted against unjitted: float32 op by op and fused.


@pytest.fixture(scope="module")
def setup():
  text = make_corpus()
  tok = data.CharTokenizer.from_text(text)
  cfg = ModelConfig(**{**vars(CONFIG), "vocab_size": tok.vocab_size})
  params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), cfg)
  # Scaled up, the weights predict some characters far better than others: the loss then
  # depends on which windows it is estimated on (at the init it is nearly log(vocab) on any).
  params = jax.tree.map(lambda w: 8.0 * w, params)
  return cfg, jnp.asarray(tok.encode(text)), params


def estimate(cfg, chunk_batches, batch_size=4, eval_iters=6):
  return functools.partial(evaluate.eval_loss, model_config=cfg, batch_size=batch_size,
                           eval_iters=eval_iters, chunk_batches=chunk_batches)


@pytest.mark.parametrize("chunk_batches", [2, 6])
def test_eval_loss_is_the_same_for_any_chunking(setup, chunk_batches):
  cfg, tokens, params = setup
  got = jax.jit(estimate(cfg, chunk_batches))(params, tokens, jax.random.key(2))
  whole = jax.jit(estimate(cfg, 1))
  np.testing.assert_allclose(got, whole(params, tokens, jax.random.key(2)), rtol=1e-5)
  other_key = whole(params, tokens, jax.random.key(3))
  assert abs(float(other_key) - float(got)) > 1e-2  # The windows come from the key.


@pytest.mark.parametrize("chunk_batches", [2, 3])  # Three and two chunks: lax.map loops.
def test_eval_loss_in_chunks_jitted_matches_unjitted(setup, chunk_batches):
  cfg, tokens, params = setup
  fn = estimate(cfg, chunk_batches)
  got = jax.jit(fn)(params, tokens, jax.random.key(2))
  want = unjitted(fn)(params, tokens, jax.random.key(2))
  np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)


def test_the_run_s_estimate_matches_the_unjitted_one(setup):
  cfg, tokens, params = setup
  tc = TrainConfig(batch_size=4, eval_iters=64)  # 64 tokens a batch: chunks of 32 on the CPU.
  chunk = train.largest_fitting_divisor(tc.eval_iters, tc.batch_size * cfg.block_size,
                                        evaluate.EVAL_CHUNK_TOKENS["cpu"])
  assert 1 < chunk < tc.eval_iters  # The jitted side runs a loop of several chunks.
  got = evaluate.jit_eval_loss(tc, cfg, "cpu")(params, tokens, jax.random.key(2))
  want = unjitted(estimate(cfg, chunk, tc.batch_size, tc.eval_iters))(params, tokens,
                                                                      jax.random.key(2))
  np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
