"""The levers (docs/levers.md): rotary positions, qk_norm, final_norm and Muon; the rolling
key/value cache. Each lever's forward is checked against the float64 NumPy reference
(tests/reference.py, written from the definitions); its gradients and Muon's updates are in
tests/test_reference.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from randygpt import bench_rolling, generate, model, optim
from randygpt.config import ModelConfig, SampleConfig, TrainConfig

import reference

BASE = ModelConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=2, block_size=8, dropout=0.1)
LEVERS = {"base": {}, "rope": {"position": "rope"}, "qk_norm": {"qk_norm": True},
          "final_norm": {"final_norm": True}, "softcap": {"logit_softcap": 1.0},
          "all": {"position": "rope", "qk_norm": True, "final_norm": True, "logit_softcap": 1.0}}
needs_muon = pytest.mark.skipif(not optim.muon_supported(),
                                reason=f"optax {optax.__version__} has no Muon for stacked "
                                "matrices")


def config_of(lever: str, **changes) -> ModelConfig:
  return dataclasses.replace(BASE, **LEVERS[lever], **changes)


def init(config):
  return jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), config)


def init_large(config):
  """Weights 10x the init's: logits of order 1, so that the comparisons below see every
  part of the function (at the init's scale the logits are ~1e-3)."""
  return jax.tree.map(lambda w: 10.0 * w, init(config))


def tokens(batch=2, t=8, seed=1, vocab=BASE.vocab_size):
  return jax.random.randint(jax.random.key(seed), (batch, t), 0, vocab)


def np_forward(params, tokens_BxT, config: ModelConfig):
  return reference.forward(params, tokens_BxT, config)[0]


@pytest.mark.parametrize("lever", LEVERS)
def test_forward_matches_the_numpy_reference(lever):
  config = config_of(lever)
  params = init_large(config)
  x = tokens()
  want = np_forward(params, x, config)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(model.forward(params, x, config), want, rtol=1e-4, atol=1e-4)


def test_the_reference_tells_the_levers_apart():
  # Each lever changes the function: a reference that ignored one would still pass above.
  params, x = init_large(BASE), tokens()
  base = np_forward(params, x, BASE)
  for lever in ("qk_norm", "final_norm", "softcap"):
    assert np.abs(np_forward(params, x, config_of(lever)) - base).max() > 0.1
  rope_params = init_large(config_of("rope"))
  assert np.abs(np_forward(rope_params, x, config_of("rope"))
                - np_forward(dict(rope_params, wpe=np.zeros((8, 16))), x, BASE)).max() > 0.1


def test_rope_drops_the_position_embedding_and_nothing_else():
  learned, rope = init(BASE), init(config_of("rope"))
  assert "wpe" in learned and "wpe" not in rope
  assert sum(x.size for x in jax.tree.leaves(rope)) == model.n_params(config_of("rope"))
  assert model.n_params(BASE) - model.n_params(config_of("rope")) == 8 * 16
  # The other weights are drawn as before: the same keys.
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in learned.items() if k != "wpe"},
               rope)


def test_qk_norm_final_norm_and_softcap_add_no_parameters():
  for lever in ("qk_norm", "final_norm", "softcap"):
    jax.tree.map(np.testing.assert_array_equal, init(config_of(lever)), init(BASE))


def test_softcap_bounds_the_logits():
  config = config_of("softcap")
  logits = model.forward(init_large(config), tokens(), config)
  assert np.abs(np.asarray(logits)).max() < 1.0
  assert np.abs(np.asarray(model.forward(init_large(BASE), tokens(), BASE))).max() > 1.0


def test_zero_init_zeroes_the_output_projections_and_lm_head_only():
  zeroed_paths = {"['lm_head']", "['blocks']['attn']['wo']", "['blocks']['mlp']['w2']"}
  seen = []

  def check(path, got, want):  # Every leaf: the three zeroed, the rest drawn as before.
    if jax.tree_util.keystr(path) in zeroed_paths:
      seen.append(jax.tree_util.keystr(path))
      assert not np.any(got) and np.any(want), path
    else:
      np.testing.assert_array_equal(got, want)

  jax.tree_util.tree_map_with_path(check, init(dataclasses.replace(BASE, zero_init=True)),
                                   init(BASE))
  assert sorted(seen) == sorted(zeroed_paths)


@pytest.mark.parametrize("lever", ["rope", "all"])
def test_cached_decoding_matches_forward_within_the_window(lever):
  config = config_of(lever)
  params, x = init_large(config), tokens()
  want = model.forward(params, x, config)
  logits, cache = model.forward_cached(params, x[:, :3], model.init_cache(config, 2), 0, config)
  got = [logits]
  for p in range(3, 8):
    logits, cache = model.forward_cached(params, x[:, p:p + 1], cache, p, config)
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-5)


def rolling_losses(n_layer):
  config = config_of("all", n_layer=n_layer)
  return bench_rolling.past_window_losses(init_large(config), tokens(t=4 * 8 + 1, seed=3),
                                          config)


def test_rolling_cache_of_one_layer_equals_rerunning_the_window():
  # One layer: each position's key and value depend on its own character alone, so the
  # rolling cache computes what re-running the window does; rotary positions are relative.
  losses = rolling_losses(1)
  assert losses["rolling_cache_loss"] == pytest.approx(losses["rerun_window_loss"], rel=1e-5)


def test_rolling_cache_of_two_layers_keeps_older_context():
  # Two layers: the second layer's keys and values of an old position saw the characters
  # before it, which the re-run window has dropped.
  losses = rolling_losses(2)
  assert losses["rolling_cache_loss"] != pytest.approx(losses["rerun_window_loss"], rel=1e-4)


def greedy(params, config, n_new, **changes):
  sample = SampleConfig(temperature=0.0, max_new_tokens=n_new, **changes)
  return [np.asarray(generate.generate(params, tokens(t=3), jax.random.key(0), config, sample,
                                       use_cache=use_cache)) for use_cache in (True, False)]


def test_greedy_decoding_with_the_rolling_cache_equals_uncached_within_the_window():
  config = config_of("all")
  cached, uncached = greedy(init_large(config), config, 6, rolling_cache=True)
  np.testing.assert_array_equal(cached, uncached)


def test_rolling_cache_goes_past_the_window():
  config = config_of("all", n_layer=1)  # One layer: the same text as re-running the window.
  cached, uncached = greedy(init_large(config), config, 30, rolling_cache=True)
  assert cached.shape == (2, 30)
  np.testing.assert_array_equal(cached, uncached)


def test_rolling_cache_needs_rope():
  # With learned positions the flag is ignored: the window is re-run past it.
  cached, uncached = greedy(init_large(BASE), BASE, 20, rolling_cache=True)
  np.testing.assert_array_equal(cached, uncached)


# Muon.

def test_muon_updates_the_blocks_matrices_and_adam_the_rest():
  params = init(config_of("rope"))
  labels = optim.muon_labels(params)
  assert labels["wte"] == labels["lm_head"] == "adam"
  assert labels["blocks"] == {"attn": {"wqkv": "muon", "wo": "muon"},
                              "mlp": {"w1": "muon", "w2": "muon"}}
  assert optim.muon_labels(init(BASE))["wpe"] == "adam"


def test_muon_needs_optax_0_2_7():
  assert not optim.muon_supported("0.2.5") and not optim.muon_supported("0.2.6")
  assert optim.muon_supported("0.2.7") and optim.muon_supported("0.2.10.dev0")
  assert optim.muon_supported("0.3.0")


def test_muon_is_refused_where_optax_cannot(monkeypatch):
  from conftest import raises_user_error
  monkeypatch.setattr(optim, "muon_supported", lambda: False)
  with raises_user_error("--optimizer=muon needs optax 0.2.7 or newer"):
    optim.make_optimizer(TrainConfig(optimizer="muon"))


@needs_muon
def test_muon_state_covers_the_blocks_with_wqkv_as_three_matrices():
  config = config_of("rope")
  params = init(config)
  state = optim.make_optimizer(TrainConfig(optimizer="muon")).init(params)
  muon_states = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
      s, optax.contrib.MuonState)) if isinstance(s, optax.contrib.MuonState)]
  assert len(muon_states) == 1
  shapes = jax.tree.map(lambda x: x.shape, muon_states[0].mu)
  assert shapes["blocks"] == {"attn": {"wqkv": (2, 16, 3, 16), "wo": (2, 16, 16)},
                              "mlp": {"w1": (2, 16, 64), "w2": (2, 64, 16)}}
  assert jax.tree.leaves(shapes["wte"]) == jax.tree.leaves(shapes["lm_head"]) == []


@needs_muon
def test_muon_orthogonalises_each_layer_and_each_of_q_k_v():
  params = init(config_of("rope"))
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
  muon = optim.scale_by_muon_blocks(rms=1.0)
  updates, _ = jax.jit(muon.update)(grads["blocks"], muon.init(params["blocks"]))
  wqkv = np.asarray(updates["attn"]["wqkv"]).reshape(2, 16, 3, 16)
  matrices = [wqkv[l, :, j] for l in range(2) for j in range(3)]
  matrices += [np.asarray(updates["mlp"]["w1"])[l] for l in range(2)]
  for matrix in matrices:
    scale = max(matrix.shape) ** 0.5  # rms=1: singular values near sqrt(max(in, out)).
    singular = np.linalg.svd(matrix, compute_uv=False) / scale
    assert 0.5 < singular.min() and singular.max() < 1.3, singular
  # AdamW's update of the same gradients is far from orthogonal.
  adam = optax.scale_by_adam()
  adam_wqkv = np.asarray(adam.update(grads, adam.init(params))[0]["blocks"]["attn"]["wqkv"])
  singular = np.linalg.svd(adam_wqkv[0][:, :16], compute_uv=False)
  assert singular.max() / singular.min() > 3


def test_muon_s_update_is_laid_out_by_layer_over_the_devices():
  from randygpt import sharding
  mesh = sharding.data_mesh(jax.devices("cpu")[:2])
  tree = {"even": jnp.ones((4, 3, 3)), "odd": jnp.ones((3, 3, 3))}
  out = jax.jit(lambda t: optim._by_layer(t, mesh))(tree)
  assert out["even"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert out["odd"].sharding.is_fully_replicated  # 3 layers do not divide over 2 devices.
  assert optim._by_layer(tree, None) is tree


@needs_muon
def test_muon_spread_over_two_devices_takes_the_same_step():
  from randygpt import sharding
  mesh = sharding.data_mesh(jax.devices("cpu")[:2])
  params = init(config_of("rope"))
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
  tc = TrainConfig(optimizer="muon", warmup_iters=0)
  replicated = sharding.replicated(mesh)
  params, grads = jax.device_put((params, grads), replicated)
  results = []
  for opt in (optim.make_optimizer(tc), optim.make_optimizer(tc, mesh)):
    step = jax.jit(opt.update, out_shardings=replicated)
    results.append(step(grads, jax.jit(opt.init)(params), params))
  for spread, whole in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
    np.testing.assert_allclose(spread, whole, rtol=1e-5, atol=1e-7)


@needs_muon
def test_muon_keeps_the_schedule_count_and_skips_decay_of_embeddings():
  config = config_of("rope")
  params = init(config)
  opt = optim.make_optimizer(TrainConfig(optimizer="muon", warmup_iters=2, weight_decay=0.5))
  state = jax.jit(opt.init)(params)
  update = jax.jit(opt.update)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  new = params
  for _ in range(5):
    updates, state = update(zero_grads, state, new)
    new = optax.apply_updates(new, updates)
  assert int(optim.schedule_count(state)) == 5
  np.testing.assert_array_equal(new["wte"], params["wte"])
  for path in (("lm_head",), ("blocks", "attn", "wqkv")):
    before, after = params, new
    for key in path:
      before, after = before[key], after[key]
    assert float(jnp.abs(after).sum()) < float(jnp.abs(before).sum())


# Whole runs in this process: resuming with each lever is bit-exact.

RESUMED_LEVERS = {
    "all": {"position": "rope", "qk_norm": True, "final_norm": True, "optimizer": "muon"},
    "muon": {"optimizer": "muon"}, "rope": {"position": "rope"}, "qk_norm": {"qk_norm": True},
    "final_norm": {"final_norm": True}}


@pytest.mark.parametrize("lever", [
    pytest.param(name, marks=[needs_muon] * ("optimizer" in values)
                 + [pytest.mark.slow] * (name != "all"))
    for name, values in RESUMED_LEVERS.items()])
def test_resume_with_a_lever_is_bit_exact(lever, tmp_path, monkeypatch):
  from conftest import read_metrics, restored_state, run_training, tiny, write_corpus
  monkeypatch.chdir(tmp_path)
  write_corpus(tmp_path / "c.txt")
  run = tiny(data="c.txt", log_interval=5, eval_interval=10, checkpoint_interval=10,
             max_new_tokens=70, rolling_cache=True, **RESUMED_LEVERS[lever])
  run_training("one", **run, iters=30)
  run_training("two", **run, iters=20)
  assert run_training("two", iters=30, resume=True)["status"] == "completed"
  one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
  keys = ("iter", "train_loss", "val_loss", "eval_train_loss", "lr", "grad_norm")
  assert [[r.get(k) for k in keys] for r in one] == [[r.get(k) for k in keys] for r in two]
  state_one, state_two = restored_state(tmp_path / "one"), restored_state(tmp_path / "two")
  assert jax.tree.structure(state_one) == jax.tree.structure(state_two)
  jax.tree.map(np.testing.assert_array_equal, state_one, state_two)
  assert "wpe" not in state_one["params"] or RESUMED_LEVERS[lever].get("position") != "rope"
  assert ((tmp_path / "two" / "samples.txt").read_text()
          == (tmp_path / "one" / "samples.txt").read_text())
