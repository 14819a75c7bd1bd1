import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randygpt import data, evaluate, generate, optim, train
from randygpt.config import ModelConfig, TrainConfig
from randygpt.errors import UserError

from conftest import make_corpus

CONFIG = ModelConfig(vocab_size=0, n_embd=32, n_head=4, n_layer=2, block_size=16, dropout=0.1)
TRAIN = TrainConfig(batch_size=8, learning_rate=1e-2, warmup_iters=5, min_lr=1e-3)


@pytest.fixture(scope="module")
def setup():
  text = make_corpus()
  tok = data.CharTokenizer.from_text(text)
  cfg = ModelConfig(**{**vars(CONFIG), "vocab_size": tok.vocab_size})
  tokens = jnp.asarray(tok.encode(text))
  optimizer = optim.make_optimizer(TRAIN)
  return cfg, tokens, optimizer


def fresh_state(setup):
  cfg, _, optimizer = setup
  return train.init_train_state(jax.random.key(0), cfg, optimizer)


@pytest.mark.parametrize("microbatches", [1, 4])
def test_train_step_jit_matches_eager(setup, maybe_jit, microbatches):
  cfg, tokens, optimizer = setup
  step = functools.partial(train.train_step, model_config=cfg, optimizer=optimizer,
                           schedule=optim.lr_schedule(TRAIN), microbatches=microbatches)
  step_under_test = maybe_jit(step, donate_argnums=0)
  state_a, state_b = fresh_state(setup), fresh_state(setup)
  for i in range(3):
    batch = data.get_batch(tokens, jax.random.key(i), TRAIN.batch_size, cfg.block_size)
    state_a, metrics_a = step_under_test(state_a, batch, jax.random.key(100 + i))
    state_b, metrics_b = step(state_b, batch, jax.random.key(100 + i))
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state_a, state_b)


def test_microbatches_take_the_same_step_as_the_whole_batch(setup):
  cfg, tokens, optimizer = setup
  cfg = ModelConfig(**{**vars(cfg), "dropout": 0.0})
  batch = data.get_batch(tokens, jax.random.key(0), TRAIN.batch_size, cfg.block_size)
  results = [jax.jit(functools.partial(train.train_step, model_config=cfg, optimizer=optimizer,
                                       schedule=optim.lr_schedule(TRAIN), microbatches=k))(
                                           fresh_state(setup), batch, jax.random.key(1))
             for k in (1, 2, 8)]
  for state, step_metrics in results[1:]:
    np.testing.assert_allclose(step_metrics["loss"], results[0][1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(step_metrics["grad_norm"], results[0][1]["grad_norm"],
                               rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state, results[0][0])


@pytest.mark.parametrize("batch_size, block_size, platform, requested, expected", [
    (32, 64, "cpu", 0, 4),  # 8 sequences of 64 = 512 tokens per slice.
    (32, 128, "cpu", 0, 8),
    (12, 64, "cpu", 0, 2),  # 4 slices of 3 would fit too: the fewest is taken.
    (3, 1024, "cpu", 0, 3),  # Even one sequence is longer: one sequence a slice.
    (4, 16, "cpu", 0, 1),
    (32, 64, "gpu", 0, 1),
    (32, 64, "cpu", 2, 2),
])
def test_microbatches_default_to_cache_sized_slices_on_the_cpu(
    batch_size, block_size, platform, requested, expected):
  tc = TrainConfig(batch_size=batch_size, microbatches=requested)
  model_config = ModelConfig(block_size=block_size)
  assert train.train_microbatches(tc, model_config, platform) == expected


def test_train_step_advances_the_schedule_count(setup):
  cfg, tokens, optimizer = setup
  state = fresh_state(setup)
  batch = data.get_batch(tokens, jax.random.key(0), TRAIN.batch_size, cfg.block_size)
  for _ in range(2):
    state, _ = train.train_step(state, batch, jax.random.key(1), model_config=cfg,
                                optimizer=optimizer, schedule=optim.lr_schedule(TRAIN))
  counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt"])
            if "count" in jax.tree_util.keystr(path)]
  assert counts and all(int(c) == 2 for c in counts)


def test_training_lowers_the_loss(setup):
  cfg, tokens, optimizer = setup
  step = jax.jit(functools.partial(train.train_step, model_config=cfg, optimizer=optimizer,
                                   schedule=optim.lr_schedule(TRAIN)))
  estimate = jax.jit(functools.partial(evaluate.eval_loss, model_config=cfg, batch_size=8,
                                       eval_iters=4))
  state = fresh_state(setup)
  before = float(estimate(state["params"], tokens, jax.random.key(5)))
  for i in range(60):
    batch = data.get_batch(tokens, jax.random.key(i), TRAIN.batch_size, cfg.block_size)
    state, _ = step(state, batch, jax.random.key(1000 + i))
  after = float(estimate(state["params"], tokens, jax.random.key(5)))
  assert after < before - 1.0


@pytest.mark.parametrize("chunk_batches", [1, 2, 6])
def test_eval_loss_is_the_same_for_any_chunking_jitted_or_not(setup, maybe_jit, chunk_batches):
  cfg, tokens, _ = setup
  params = fresh_state(setup)["params"]
  estimate = functools.partial(evaluate.eval_loss, model_config=cfg, batch_size=4,
                               eval_iters=6)
  chunked = maybe_jit(functools.partial(estimate, chunk_batches=chunk_batches))
  got = chunked(params, tokens, jax.random.key(2))
  np.testing.assert_allclose(got, estimate(params, tokens, jax.random.key(2)), rtol=1e-5)
  other_key = estimate(params, tokens, jax.random.key(3))
  assert abs(float(other_key) - float(got)) > 1e-6  # The windows come from the key.


@pytest.mark.parametrize("count, tokens_each, max_tokens, expected", [
    (200, 2048, 2048, 1), (200, 2048, 20000, 8), (200, 256, 2048, 8), (7, 256, 2048, 7),
    (7, 512, 2048, 1), (20, 4096, 2048, 1)])
def test_largest_fitting_divisor(count, tokens_each, max_tokens, expected):
  assert train.largest_fitting_divisor(count, tokens_each, max_tokens) == expected


TOKENIZER = data.CharTokenizer.from_text("hello world\nHELLO:")
DEFAULT = ("ROMEO:",)


def test_default_prompt_without_newline_in_vocabulary_starts_from_first_character():
  assert generate.check_prompts(DEFAULT, data.CharTokenizer.from_text("abc")) == ("a",)


def test_user_prompt_outside_vocabulary_is_an_error():
  with pytest.raises(UserError, match="'Z'"):
    generate.check_prompts(("hello", "Zed"), TOKENIZER)


def test_default_prompt_outside_vocabulary_falls_back_to_newline(capsys):
  assert generate.check_prompts(DEFAULT, TOKENIZER) == ("\n",)
  assert "default prompt" in capsys.readouterr().out


def test_prompts_that_fit_are_kept():
  assert generate.check_prompts(("HELLO:", "world"), TOKENIZER) == ("HELLO:", "world")
