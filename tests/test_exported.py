"""The train step kept between runs (runtime/exported.py): saved once, loaded after, the
same step as the one traced; another config or other code is another entry."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from randygpt import data, optim, train
from randygpt.config import ModelConfig, TrainConfig
from randygpt.runtime import devices, exported

MODEL = ModelConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=2, block_size=8, dropout=0.1)
TRAIN = TrainConfig(batch_size=8, microbatches=2, learning_rate=1e-2, warmup_iters=0)
TOKENS = np.random.default_rng(0).integers(0, MODEL.vocab_size, 500, np.int32)


@pytest.fixture(scope="module")
def run():
  """The jitted step on 2 devices, a state maker, a batch and a dropout key."""
  mesh = devices.data_mesh(jax.devices("cpu")[:2])
  init = jax.jit(functools.partial(train.init_train_state, model_config=MODEL,
                                   optimizer=optim.make_optimizer(TRAIN)),
                 out_shardings=devices.replicated(mesh))
  batch = jax.device_put(data.get_batch(TOKENS, jax.random.key(1), TRAIN.batch_size,
                                        MODEL.block_size), devices.batch_sharded(mesh))
  return (train.jit_train_step(MODEL, TRAIN, mesh, TRAIN.microbatches),
          lambda: init(jax.random.key(0)), batch, jax.random.key(2))


def two_steps(step, new_state, batch, key):
  state, first = step(new_state(), batch, key)
  state, second = step(state, batch, jax.random.fold_in(key, 1))
  return state, [first, second]


def test_a_saved_step_loads_and_takes_the_traced_steps(run, tmp_path, monkeypatch):
  jitted, new_state, batch, key = run
  want_state, want = two_steps(jitted, new_state, batch, key)
  saving = exported.compile_step(jitted, "config", tmp_path, new_state(), batch, key)
  assert len(list(tmp_path.glob("*.train_step"))) == 1
  monkeypatch.setattr(exported, "_export_and_save", None)  # Loading must not trace again.
  loading = exported.compile_step(jitted, "config", tmp_path, new_state(), batch, key)
  for step in (saving, loading):
    state, got = two_steps(step, new_state, batch, key)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-6)
      np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-6)
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    for g, w in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_another_config_or_other_code_is_another_entry(run, tmp_path, monkeypatch):
  jitted, new_state, batch, key = run
  exported.compile_step(jitted, "config", tmp_path, new_state(), batch, key)
  exported.compile_step(jitted, repr(dataclasses.replace(TRAIN, seed=2)), tmp_path,
                        new_state(), batch, key)
  package = tmp_path / "edited"
  package.mkdir()
  (package / "model.py").write_text("# an edit\n")
  monkeypatch.setattr(exported, "PACKAGE", package)
  exported.compile_step(jitted, "config", tmp_path, new_state(), batch, key)
  assert len(list(tmp_path.glob("*.train_step"))) == 3


def test_an_unreadable_entry_is_replaced(run, tmp_path):
  jitted, new_state, batch, key = run
  exported.compile_step(jitted, "config", tmp_path, new_state(), batch, key)
  [entry] = tmp_path.glob("*.train_step")
  entry.write_bytes(b"half a fil")
  step = exported.compile_step(jitted, "config", tmp_path, new_state(), batch, key)
  assert np.isfinite(step(new_state(), batch, key)[1]["loss"])
  assert entry.stat().st_size > 1000 and not list(tmp_path.glob("*.partial"))
