"""The PyTorch reference computes what randygpt computes: same logits, same gradients of
every parameter, the same AdamW step. It is what bench.py's PyTorch ratios time, so these
tests are what makes them ratios of the same work. torch is optional: the module is skipped
without it (.ci/run installs its CPU build)."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from randygpt import model, optim, train
from randygpt.config import ModelConfig, TrainConfig

torch = pytest.importorskip("torch", reason="the PyTorch reference is optional "
                            "(pip install torch==2.13.0)")
from randygpt import torch_reference  # noqa: E402  needs torch

CONFIG = ModelConfig(vocab_size=23, n_embd=32, n_head=4, n_layer=2, block_size=16,
                     dropout=0.0)


@pytest.fixture(autouse=True)
def one_thread():
  """torch on one thread, as it runs beside the other tests' processes (pytest-xdist):
  threads that spin-wait for a busy core made these tests 10x slower. `measure` sets its
  own count; the count is restored after each test."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture
def pair():
  """randygpt's init scaled up 10x (logits of order 1, where the init's are ~1e-3: every
  part of the function then shows), the PyTorch model holding the same weights, a batch."""
  params = jax.tree.map(lambda w: 10.0 * w, model.init_params(jax.random.key(0), CONFIG))
  tokens_BxT = np.array(jax.random.randint(jax.random.key(1), (3, 16), 0, 23))
  return params, torch_reference.GPT(CONFIG).load_jax_params(params), tokens_BxT


def torch_params(gpt, of=lambda p: p.data):
  """`of` each of the PyTorch model's weights (default: the weights), as randygpt's
  parameter tree: (in, out) matrices, blocks stacked by layer."""
  def matrix(linear):
    return of(linear.weight).numpy().T

  def stacked(name):
    return np.stack([matrix(getattr(block, name)) for block in gpt.blocks])

  return {"wte": of(gpt.wte.weight).numpy(), "wpe": of(gpt.wpe.weight).numpy(),
          "lm_head": matrix(gpt.lm_head),
          "blocks": {"attn": {"wqkv": stacked("wqkv"), "wo": stacked("wo")},
                     "mlp": {"w1": stacked("w1"), "w2": stacked("w2")}}}


def assert_trees_close(got, want, atol):
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = np.asarray(functools.reduce(lambda tree, key: tree[key.key], path, want))
    np.testing.assert_allclose(g, w, rtol=0, atol=atol(w), err_msg=jax.tree_util.keystr(path))


def test_logits_match_randygpt(pair):
  params, gpt, tokens_BxT = pair
  expected_BxTxV = model.forward(params, tokens_BxT, CONFIG)
  with torch.no_grad():
    logits_BxTxV = gpt.eval()(torch.from_numpy(tokens_BxT).long())
  assert np.abs(expected_BxTxV).max() > 1.0
  np.testing.assert_allclose(logits_BxTxV.numpy(), expected_BxTxV, rtol=1e-5, atol=1e-5)


def test_gradients_match_randygpt(pair):
  params, gpt, tokens_BxT = pair
  inputs_BxT, targets_BxT = tokens_BxT[:, :-1], tokens_BxT[:, 1:]
  loss, grads = jax.value_and_grad(model.loss_fn)(params, (inputs_BxT, targets_BxT), CONFIG)
  logits_BxTxV = gpt(torch.from_numpy(inputs_BxT).long())
  torch_loss = torch.nn.functional.cross_entropy(logits_BxTxV.flatten(0, 1),
                                                 torch.from_numpy(targets_BxT).long().flatten())
  torch_loss.backward()
  np.testing.assert_allclose(torch_loss.item(), loss, rtol=1e-5)
  # Every weight's gradient, to 1e-5 of its array's largest entry.
  assert_trees_close(torch_params(gpt, of=lambda p: p.grad), grads,
                     lambda want: 1e-5 * np.abs(want).max())


def test_one_train_step_matches_randygpt_s(pair):
  # One AdamW step without dropout (PyTorch's masks are its own) at the peak learning rate:
  # the same clipping (torch adds 1e-6 to the norm it divides by), decay of all but the
  # embeddings (torch's p(1 - lr wd) - lr adam is optax's p - lr (adam + wd p)) and Adam.
  params, gpt, tokens_BxT = pair
  tc = TrainConfig(learning_rate=1e-2, warmup_iters=0, weight_decay=0.5, grad_clip=1.0)
  batch = tokens_BxT[:, :-1], tokens_BxT[:, 1:]
  optimizer = optim.make_optimizer(tc)
  state, step_metrics = jax.jit(functools.partial(
      train.train_step, model_config=CONFIG, optimizer=optimizer,
      schedule=optim.lr_schedule(tc)))({"params": params, "opt": optimizer.init(params)},
                                       batch, jax.random.key(0))
  assert float(step_metrics["grad_norm"]) > tc.grad_clip  # Clipping acts.
  torch_loss = torch_reference.train_step(
      gpt.train(), torch_reference.make_optimizer(gpt, tc, fused=False),
      *(torch.from_numpy(x).long() for x in batch), grad_clip=tc.grad_clip)
  np.testing.assert_allclose(torch_loss.item(), step_metrics["loss"], rtol=1e-5)
  # Adam's first step moves each weight by about the learning rate; float32's gradients near
  # Adam's eps (1e-8) differ by far less.
  assert_trees_close(torch_params(gpt), state["params"], lambda want: 1e-3 * tc.learning_rate)


@pytest.mark.parametrize("fused", [False, True])
def test_train_steps_lower_the_loss(pair, fused):
  _, gpt, tokens_BxT = pair
  config = dataclasses.replace(CONFIG, dropout=0.1)
  gpt = torch_reference.GPT(config).train()
  optimizer = torch_reference.make_optimizer(gpt, TrainConfig(learning_rate=1e-2), fused)
  batch = torch.from_numpy(tokens_BxT[:, :-1]).long(), torch.from_numpy(tokens_BxT[:, 1:]).long()
  losses = [torch_reference.train_step(gpt, optimizer, *batch, grad_clip=1.0).item()
            for _ in range(20)]
  assert losses[-1] < 0.5 * losses[0]


def test_measure_reports_a_step_time():
  tokens = np.arange(500) % CONFIG.vocab_size
  result = torch_reference.measure(CONFIG, TrainConfig(batch_size=4), tokens, steps=3,
                                   warmup_steps=1)
  assert result["torch_adamw"] in ("fused", "foreach")
  assert result["torch_ms_per_step_p10"] <= result["torch_ms_per_step"] <= result[
      "torch_ms_per_step_p90"]
  assert result["torch_tokens_per_sec"] == pytest.approx(
      4 * 16 / (result["torch_ms_per_step"] / 1e3))
