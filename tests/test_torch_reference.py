"""The PyTorch reference computes what randygpt computes: same logits, same gradients."""

import dataclasses

import jax
import numpy as np
import pytest

from randygpt import model
from randygpt.config import ModelConfig, TrainConfig

torch = pytest.importorskip("torch", reason="the PyTorch reference is optional "
                            "(pip install torch==2.13.0)")
from randygpt import torch_reference  # noqa: E402  needs torch

CONFIG = ModelConfig(vocab_size=23, n_embd=32, n_head=4, n_layer=2, block_size=16,
                     dropout=0.0)


@pytest.fixture
def pair():
  params = model.init_params(jax.random.key(0), CONFIG)
  tokens_BxT = np.array(jax.random.randint(jax.random.key(1), (3, 16), 0, 23))
  return params, torch_reference.GPT(CONFIG).load_jax_params(params), tokens_BxT


def test_logits_match_randygpt(pair):
  params, gpt, tokens_BxT = pair
  expected_BxTxV = model.forward(params, tokens_BxT, CONFIG)
  with torch.no_grad():
    logits_BxTxV = gpt.eval()(torch.from_numpy(tokens_BxT).long())
  np.testing.assert_allclose(logits_BxTxV.numpy(), expected_BxTxV, atol=1e-5)


def test_gradients_match_randygpt(pair):
  params, gpt, tokens_BxT = pair
  inputs_BxT, targets_BxT = tokens_BxT[:, :-1], tokens_BxT[:, 1:]
  loss, grads = jax.value_and_grad(model.loss_fn)(params, (inputs_BxT, targets_BxT), CONFIG)
  logits_BxTxV = gpt(torch.from_numpy(inputs_BxT).long())
  torch_loss = torch.nn.functional.cross_entropy(logits_BxTxV.flatten(0, 1),
                                                 torch.from_numpy(targets_BxT).long().flatten())
  torch_loss.backward()
  np.testing.assert_allclose(torch_loss.item(), loss, rtol=1e-5)
  np.testing.assert_allclose(gpt.blocks[1].wqkv.weight.grad.numpy().T,
                             grads["blocks"]["attn"]["wqkv"][1], atol=1e-6)
  np.testing.assert_allclose(gpt.wte.weight.grad.numpy(), grads["wte"], atol=1e-6)


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
