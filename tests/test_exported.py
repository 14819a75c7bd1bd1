"""Lowerings kept between runs (runtime/exported.py): saved once, loaded after, the same
function as the one traced; another config, other code or another traced function is
another entry."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from randygpt import data, optim, train
from randygpt.config import ModelConfig, TrainConfig
from randygpt import sharding
from randygpt.runtime import exported

MODEL = ModelConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=2, block_size=8, dropout=0.1)
TRAIN = TrainConfig(batch_size=8, microbatches=2, learning_rate=1e-2, warmup_iters=0)
TOKENS = np.random.default_rng(0).integers(0, MODEL.vocab_size, 500, np.int32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setattr(exported, "_CACHE", {"dir": tmp_path})
  return tmp_path


@pytest.fixture(scope="module")
def run():
  """The jitted step on 2 devices, a state maker, a batch and a dropout key."""
  mesh = sharding.data_mesh(jax.devices("cpu")[:2])
  init = jax.jit(functools.partial(train.init_train_state, model_config=MODEL,
                                   optimizer=optim.make_optimizer(TRAIN)),
                 out_shardings=sharding.replicated(mesh))
  batch = jax.device_put(data.get_batch(TOKENS, jax.random.key(1), TRAIN.batch_size,
                                        MODEL.block_size), sharding.batch_sharded(mesh))
  return (train.jit_train_step(MODEL, TRAIN, mesh, TRAIN.microbatches),
          lambda: init(jax.random.key(0)), batch, jax.random.key(2))


def kept_step(run, config_key="config"):
  jitted, new_state, batch, key = run
  return exported.compile_kept(jitted, new_state(), batch, key, donate_argnums=(0,),
                               config_key=config_key)


def two_steps(step, new_state, batch, key):
  state, first = step(new_state(), batch, key)
  state, second = step(state, batch, jax.random.fold_in(key, 1))
  return state, [first, second]


def test_a_kept_step_loads_and_takes_the_traced_steps(run, cache, monkeypatch):
  jitted, new_state, batch, key = run
  want_state, want = two_steps(jitted, new_state, batch, key)
  saving = kept_step(run)
  assert len(list(cache.glob("*.lowered"))) == 1
  monkeypatch.setattr(exported, "_export_and_save", None)  # Loading must not lower again.
  loading = kept_step(run)
  for step in (saving, loading):
    state, got = two_steps(step, new_state, batch, key)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-6)
      np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-6)
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    for g, w in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_another_config_or_other_code_is_another_entry(run, cache, monkeypatch):
  kept_step(run)
  kept_step(run, repr(dataclasses.replace(TRAIN, seed=2)))
  package = cache / "edited"
  package.mkdir()
  (package / "model.py").write_text("# an edit\n")
  monkeypatch.setattr(exported, "PACKAGE", package)
  kept_step(run)
  assert len(list(cache.glob("*.lowered"))) == 3


def test_an_unreadable_entry_is_replaced(run, cache):
  jitted, new_state, batch, key = run
  kept_step(run)
  [entry] = cache.glob("*.lowered")
  entry.write_bytes(b"half a fil")
  assert np.isfinite(kept_step(run)(new_state(), batch, key)[1]["loss"])
  assert entry.stat().st_size > 1000 and not list(cache.glob("*.partial"))


def test_an_entry_another_user_could_write_is_not_unpickled(run, cache, monkeypatch):
  kept_step(run)
  [entry] = cache.glob("*.lowered")
  entry.chmod(0o646)
  unpickled = []
  monkeypatch.setattr(exported.pickle, "loads", lambda data: unpickled.append(data))
  kept_step(run)  # Lowered again and saved, replacing the entry with one of this run's.
  assert unpickled == [] and entry.stat().st_mode & 0o777 == 0o600


def test_a_function_is_kept_by_its_trace(cache, monkeypatch):
  """The window sampler closes over its key: the same seed loads the kept lowering, another
  seed is another entry; each draws what its plain jitted function draws."""
  steps = np.arange(64, dtype=np.uint32)
  def draws(seed):
    sampler = data.WindowSampler(TOKENS, jax.random.key(seed), 4, 8)
    return np.asarray(sampler._draw_many(steps)), exported.compile_kept(sampler._draw_many,
                                                                        steps)(steps)
  want, got = draws(0)
  np.testing.assert_array_equal(got, want)
  with monkeypatch.context() as patch:
    patch.setattr(exported, "_export_and_save", None)  # Loading must not lower again.
    np.testing.assert_array_equal(draws(0)[1], want)
  other_want, other = draws(1)
  np.testing.assert_array_equal(other, other_want)
  assert not np.array_equal(other, want) and len(list(cache.glob("*.lowered"))) == 2


def test_host_arguments_are_kept_only_when_the_default_device_is_a_cpu(cache, monkeypatch):
  """Host (NumPy) arguments run on the default device: a lowering exported for the CPU
  cannot be called with them where a GPU is the default (it failed so on an H200), so
  none is kept there; the window sampler puts its steps on the CPU itself."""
  double = jax.jit(lambda x: 2 * x)
  assert int(exported.compile_kept(double, np.arange(3))(np.arange(3))[2]) == 4
  assert len(list(cache.glob("*.lowered"))) == 1
  monkeypatch.setattr(exported, "_default_platform", lambda: "gpu")
  assert int(exported.compile_kept(double, np.arange(4))(np.arange(4))[3]) == 6
  assert len(list(cache.glob("*.lowered"))) == 1  # Compiled plainly: nothing kept.
  sampler = data.WindowSampler(np.arange(100), jax.random.key(0), 2, 4,
                               compile=functools.partial(exported.compile_kept))
  sampler(0)
  assert len(list(cache.glob("*.lowered"))) == 2  # Its steps are on the CPU: kept.
