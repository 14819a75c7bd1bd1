import functools

import jax
import numpy as np
import pytest

from randygpt import data, evaluate, model
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt.runtime import placement

import reference
from conftest import make_corpus

CONFIG = ModelConfig(vocab_size=0, n_embd=16, n_head=2, n_layer=2, block_size=16)
LOSS_RTOL = 1e-5  # float32 against the float64 reference (tests/reference.py).


@pytest.fixture(scope="module")
def setup():
  text = make_corpus()
  tok = data.CharTokenizer.from_text(text)
  cfg = ModelConfig(**{**vars(CONFIG), "vocab_size": tok.vocab_size})
  params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), cfg)
  # Scaled up, the weights predict some characters far better than others: the loss then
  # depends on which windows it is estimated on (at the init it is nearly log(vocab) on any).
  params = jax.tree.map(lambda w: 8.0 * w, params)
  return cfg, tok.encode(text), params


def batch(tokens, seed, cfg, n=24):
  starts = data.window_starts(jax.random.key(seed), n, len(tokens), cfg.block_size)
  return data.windows(tokens, starts, cfg.block_size)


def estimate(cfg, chunks):
  return functools.partial(evaluate.eval_loss, model_config=cfg, chunks=chunks)


@pytest.mark.parametrize("chunks", [2, 6])
def test_eval_loss_is_the_same_for_any_chunking(setup, chunks):
  cfg, tokens, params = setup
  got = jax.jit(estimate(cfg, chunks))(params, batch(tokens, 2, cfg))
  whole = jax.jit(estimate(cfg, 1))
  np.testing.assert_allclose(got, whole(params, batch(tokens, 2, cfg)), rtol=1e-5)
  other_windows = whole(params, batch(tokens, 3, cfg))
  assert abs(float(other_windows) - float(got)) > 1e-2  # The loss is the windows'.


def test_eval_loss_in_chunks_matches_the_reference(setup):
  cfg, tokens, params = setup
  windows = batch(tokens, 2, cfg)
  got = jax.jit(estimate(cfg, 3))(params, windows)  # Three chunks: a lax.map loop.
  np.testing.assert_allclose(got, reference.loss(params, windows, cfg), rtol=LOSS_RTOL)


def test_the_run_s_estimate_matches_the_reference(setup):
  cfg, tokens, params = setup
  tc = TrainConfig(batch_size=4, eval_iters=64)  # 64 tokens a batch: 2 chunks on the CPU.
  assert placement.eval_chunks(tc, cfg, "cpu") == 2  # The estimate loops over chunks.
  splits = dict(zip(("train", "val"), data.split(tokens, cfg.block_size)))
  evaluator = evaluate.Evaluator(jax.devices("cpu")[0], cfg, SampleConfig(), splits,
                                 jax.random.key(5), tc, chunks=2)
  got = evaluator.estimates(params)
  for index, name in enumerate(("train", "val")):  # Stream 0 draws train, 1 val windows.
    starts = data.window_starts(jax.random.fold_in(jax.random.key(5), index), 256,
                                len(splits[name]), cfg.block_size)
    want = reference.loss(params, data.windows(splits[name], starts, cfg.block_size), cfg)
    key = {"train": "eval_train_loss", "val": "val_loss"}[name]
    np.testing.assert_allclose(got[key], want, rtol=LOSS_RTOL)


def test_the_full_val_loss_is_every_tiling_window_once_matching_the_reference(setup):
  cfg, tokens, params = setup
  tc = TrainConfig(batch_size=4, eval_iters=2)  # Batches of 8 windows, in 2 chunks.
  splits = dict(zip(("train", "val"), data.split(tokens, cfg.block_size)))
  evaluator = evaluate.Evaluator(jax.devices("cpu")[0], cfg, SampleConfig(), splits,
                                 jax.random.key(5), tc, chunks=2)
  loss, windows = evaluator.full_val_loss(params)
  starts = np.arange(0, len(splits["val"]) - cfg.block_size, cfg.block_size)
  assert windows == len(starts) == 37 and windows % 8  # The last batch is padded.
  end = starts[-1] + cfg.block_size + 1  # The last window's end: no room for another.
  assert end <= len(splits["val"]) < end + cfg.block_size
  want = reference.loss(params, data.windows(splits["val"], starts, cfg.block_size), cfg)
  np.testing.assert_allclose(loss, want, rtol=LOSS_RTOL)
  assert abs(loss - evaluator.estimates(params)["val_loss"]) > 1e-3  # Not the estimate's windows.


def test_tiling_windows_are_spread_evenly_past_the_cap():
  assert list(evaluate.tiling_starts(100, 16, 99)) == [0, 16, 32, 48, 64, 80]
  assert list(evaluate.tiling_starts(100, 16, 3)) == [0, 32, 80]
