"""randygpt against the float64 NumPy reference (tests/reference.py), which is written from
the definitions and imports nothing of randygpt: the loss and the gradient of every parameter
with each lever (and with dropout, both sides given the same keep-masks), the schedule, the
optimizer's updates (AdamW; Muon for the blocks' matrices) and whole train steps. And the
reference's own backward pass against finite differences of its forward.

float32 against float64: losses agree to ~1e-7 relative and gradients to ~1e-6 of each
array's largest entry; updates to ~3e-5 of the learning rate, where float32 gradients near
Adam's eps (1e-8) move the most. A wrong mask, sign, layer or formula moves them by far more
(a gradient by its own size, a parameter by a learning rate).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from randygpt import model, optim, train
from randygpt.config import ModelConfig, TrainConfig

CONFIG = ModelConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=2, block_size=8, dropout=0.1)
LEVERS = {"base": {}, "rope": {"position": "rope"}, "qk_norm": {"qk_norm": True},
          "final_norm": {"final_norm": True}, "softcap": {"logit_softcap": 1.0},
          "all": {"position": "rope", "qk_norm": True, "final_norm": True, "logit_softcap": 1.0}}
B, T = 3, CONFIG.block_size
LOSS_RTOL = 1e-5
GRAD_TOL = 1e-5  # Of each gradient array's largest entry.
UPDATE_TOL = 1e-3  # Of the learning rate.
needs_muon = pytest.mark.skipif(not optim.muon_supported(),
                                reason=f"optax {optax.__version__} has no Muon for stacked "
                                "matrices")


def config_of(lever: str, **changes) -> ModelConfig:
  return dataclasses.replace(CONFIG, **LEVERS[lever], **changes)


def large_params(config, seed=0):
  """The init's weights times 10: logits of order 1, so that every part of the function
  shows in the loss (at the init's scale the logits are ~1e-3)."""
  params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(seed), config)
  return jax.tree.map(lambda w: 10.0 * w, params)


def batch_of(seed, batch=B):
  windows = np.asarray(jax.random.randint(jax.random.key(seed), (batch, T + 1), 0,
                                          CONFIG.vocab_size))
  return windows[:, :-1], windows[:, 1:]


def keep_masks(rng, config, batch=B):
  """The keep-masks randygpt draws for a whole batch of `batch` rows (rows 0...), which the
  reference is given: they are a hash, not a formula to write again."""
  return np.asarray(model.dropout_masks(rng, jnp.arange(batch), config, T))


def assert_trees_close(got, want, atol):
  """Each array of `got` (float32) within atol(its `want` array) of `want` (float64)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = functools.reduce(lambda tree, key: tree[key.key], path, want)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=atol(w),
                               err_msg=jax.tree_util.keystr(path))


def assert_grads_close(got, want):
  """Each gradient array within GRAD_TOL of its largest entry (none is all zeros)."""
  assert all(np.abs(w).max() > 0 for w in jax.tree.leaves(want))
  assert_trees_close(got, want, lambda w: GRAD_TOL * np.abs(w).max())


loss_and_grads = jax.jit(jax.value_and_grad(model.loss_fn), static_argnames=("config", "train"))

CASES = [*((lever, False) for lever in LEVERS), ("base", True), ("all", True)]


@pytest.mark.parametrize("lever, dropout", CASES,
                         ids=[f"{lever}{'-dropout' * dropout}" for lever, dropout in CASES])
def test_loss_and_gradients_match_the_reference(lever, dropout):
  config = config_of(lever)
  params, batch, rng = large_params(config), batch_of(1), jax.random.key(2)
  keep = keep_masks(rng, config) if dropout else None
  loss, grads = loss_and_grads(params, batch, config, train=dropout, rng=rng)
  want_loss, want_grads = reference.loss_and_grads(params, batch, config, keep)
  assert abs(want_loss - np.log(CONFIG.vocab_size)) > 0.05  # Not the uniform guess.
  np.testing.assert_allclose(float(loss), want_loss, rtol=LOSS_RTOL)
  assert_grads_close(grads, want_grads)
  if dropout:  # The masks matter: without them the reference is 100 tolerances off.
    assert abs(reference.loss(params, batch, config) - want_loss) > 100 * LOSS_RTOL * want_loss


PARAMETER_PATHS = [("wte",), ("wpe",), ("lm_head",), ("blocks", "attn", "wqkv"),
                   ("blocks", "attn", "wo"), ("blocks", "mlp", "w1"), ("blocks", "mlp", "w2")]


@pytest.mark.parametrize("lever, dropout", CASES,
                         ids=[f"{lever}{'-dropout' * dropout}" for lever, dropout in CASES])
def test_the_reference_backward_pass_matches_finite_differences(lever, dropout):
  # The hand-derived gradient against central differences of the reference's own forward,
  # in float64, at a few coordinates of every parameter.
  config = config_of(lever)
  params, batch = reference.float64(large_params(config)), batch_of(1)
  keep = keep_masks(jax.random.key(2), config) if dropout else None
  _, grads = reference.loss_and_grads(params, batch, config, keep)
  draw = np.random.default_rng(0)
  for path in PARAMETER_PATHS:
    if path[0] not in params:
      continue
    leaf = functools.reduce(lambda tree, key: tree[key], path, grads)
    largest = np.unravel_index(np.abs(leaf).argmax(), leaf.shape)
    for index in [largest, *(tuple(draw.integers(0, n) for n in leaf.shape) for _ in range(2))]:
      numeric = reference.finite_difference(params, batch, config, path, index, keep)
      assert abs(numeric - leaf[index]) < 1e-7 * np.abs(leaf).max() + 1e-9, (path, index)


@pytest.mark.parametrize("schedule, fraction", [("cosine", 0.2), ("wsd", 0.2), ("wsd", 1.0)])
@pytest.mark.parametrize("warmup, horizon, iters", [(3, 10, 50), (0, 6, 50), (4, 0, 12),
                                                    (20, 8, 50)])
def test_the_schedule_matches_the_reference(warmup, horizon, iters, schedule, fraction):
  tc = TrainConfig(learning_rate=3e-3, min_lr=3e-4, warmup_iters=warmup,
                   lr_decay_iters=horizon, iters=iters, lr_schedule=schedule,
                   decay_fraction=fraction)
  schedule = optim.lr_schedule(tc)
  end = horizon or iters
  want = [reference.learning_rate(step, tc) for step in range(end + 3)]
  np.testing.assert_allclose([float(schedule(step)) for step in range(end + 3)], want,
                             rtol=1e-6, atol=1e-12)
  assert want[0] == (0.0 if warmup else tc.learning_rate)
  assert want[min(warmup, end)] == pytest.approx(tc.learning_rate)
  assert want[-1] == pytest.approx(tc.min_lr)  # Flat after the horizon.


def random_tree(like, seed, norm):
  """Normal noise shaped as `like`, scaled to a global norm of `norm`."""
  tree = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed + x.size), x.shape),
                      like)
  return jax.tree.map(lambda x: x * (norm / optax.tree_utils.tree_norm(tree)), tree)


# Four updates: the warmup's first (a learning rate of 0), the peak, two of the cosine; the
# gradient norms around grad_clip = 1, so that clipping acts on two of them.
STEP_NORMS = (0.3, 9.0, 0.6, 1.5)
OPTIMIZER = TrainConfig(warmup_iters=1, lr_decay_iters=4, learning_rate=1e-2, min_lr=1e-3,
                        weight_decay=0.5, beta1=0.8, beta2=0.95)


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=needs_muon)])
def test_optimizer_updates_match_the_reference(optimizer):
  tc = dataclasses.replace(OPTIMIZER, optimizer=optimizer)
  config = config_of("rope" if optimizer == "muon" else "base")  # wpe, and none.
  params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), config)
  opt = optim.make_optimizer(tc)
  state, want_state = jax.jit(opt.init)(params), reference.init_state(params)
  update = jax.jit(opt.update)
  for step, norm in enumerate(STEP_NORMS):
    grads = random_tree(params, 100 * step, norm)
    updates, state = update(grads, state, params)
    want_params, want_state, lr = reference.optimizer_step(params, grads, want_state, tc)
    assert float(optim.lr_schedule(tc)(step)) == pytest.approx(lr, rel=1e-6)
    if step == 0:
      assert lr == 0.0
      jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)
      continue
    # The update, in units of the learning rate: of order 1 (Adam's about 1 per entry,
    # Muon's an RMS of muon_rms, decay 0.5 * w).
    got = jax.tree.map(lambda u: np.asarray(u, np.float64) / lr, updates)
    want = jax.tree.map(lambda new, old: (new - np.asarray(old, np.float64)) / lr,
                        want_params, params)
    assert_trees_close(got, want, lambda w: UPDATE_TOL)
    if optimizer == "muon":
      # Each orthogonalised matrix (singular values near 1) times muon_rms * sqrt(max(in,
      # out)) has an RMS near muon_rms: the D x 4D w1 as the D x D k of wqkv (the decay
      # adds ~0.01).
      d = config.n_embd
      for matrix in (got["blocks"]["mlp"]["w1"][0], got["blocks"]["attn"]["wqkv"][1][:, d:2 * d]):
        assert 0.5 * tc.muon_rms < np.sqrt(np.mean(matrix ** 2)) < 1.25 * tc.muon_rms
    params = optax.apply_updates(params, updates)


TRAIN = TrainConfig(warmup_iters=0, lr_decay_iters=10, learning_rate=1e-2, min_lr=1e-3,
                    grad_clip=1.0)


@pytest.mark.parametrize("optimizer, lever", [
    ("adamw", "base"), pytest.param("muon", "all", marks=needs_muon)])
def test_train_steps_match_the_reference(optimizer, lever):
  """Two steps of train.train_step, one slice (no microbatches), with dropout: the loss,
  gradient norm and learning rate it reports and the parameters it leaves."""
  config, tc = config_of(lever), dataclasses.replace(TRAIN, optimizer=optimizer)
  opt = optim.make_optimizer(tc)
  params = large_params(config)
  state = {"params": params, "opt": jax.jit(opt.init)(params)}
  step = jax.jit(functools.partial(train.train_step, model_config=config, optimizer=opt,
                                   schedule=optim.lr_schedule(tc)))
  want_params, want_state = params, reference.init_state(params)
  for i in range(2):
    batch, rng = batch_of(10 + i), jax.random.key(20 + i)
    state, metrics = step(state, batch, rng)
    want_loss, grads = reference.loss_and_grads(want_params, batch, config,
                                                keep_masks(rng, config))
    want_params, want_state, lr = reference.optimizer_step(want_params, grads, want_state, tc)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=LOSS_RTOL)
    np.testing.assert_allclose(float(metrics["grad_norm"]), reference.global_norm(grads),
                               rtol=1e-5)
    np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-6)
    assert reference.global_norm(grads) > tc.grad_clip  # Clipped.
    assert_trees_close(state["params"], want_params, lambda w: UPDATE_TOL * lr)
    want_params = jax.tree.map(np.asarray, state["params"])  # Step on from the same weights.
