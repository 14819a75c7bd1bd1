"""A PyTorch eager implementation of randygpt's model and train step, for the benchmark.

The same architecture, shapes and FLOPs as randygpt.model (pre-norm blocks with gain-free
RMSNorm, fused QKV, causal attention, squared-ReLU MLP, dropout on each block output, no
biases, untied lm_head), written as a competent PyTorch user would for the CPU: 2-D
matmuls, `scaled_dot_product_attention`, one thread per core, and the faster of AdamW's
implementations. torch is an optional, benchmark-only dependency:
`pip install torch==2.13.0`.
"""

import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from randygpt import model
from randygpt.runtime import cores
from randygpt.config import ModelConfig, TrainConfig


class Block(nn.Module):

  def __init__(self, config: ModelConfig):
    super().__init__()
    d = config.n_embd
    self.n_head, self.dropout = config.n_head, config.dropout
    self.wqkv = nn.Linear(d, 3 * d, bias=False)
    self.wo = nn.Linear(d, d, bias=False)
    self.w1 = nn.Linear(d, 4 * d, bias=False)
    self.w2 = nn.Linear(4 * d, d, bias=False)

  def forward(self, x_NxD: torch.Tensor, batch: int) -> torch.Tensor:
    n, d = x_NxD.shape
    t, h = n // batch, self.n_head
    qkv_3xBxHxTxK = (self.wqkv(_rmsnorm(x_NxD)).view(batch, t, 3, h, d // h)
                     .permute(2, 0, 3, 1, 4))
    out_BxHxTxK = F.scaled_dot_product_attention(*qkv_3xBxHxTxK, is_causal=True)
    attn_NxD = self.wo(out_BxHxTxK.transpose(1, 2).reshape(n, d))
    x_NxD = x_NxD + F.dropout(attn_NxD, self.dropout, self.training)
    mlp_NxD = self.w2(torch.square(F.relu(self.w1(_rmsnorm(x_NxD)))))
    return x_NxD + F.dropout(mlp_NxD, self.dropout, self.training)


def _rmsnorm(x_NxD: torch.Tensor) -> torch.Tensor:
  return x_NxD * torch.rsqrt(x_NxD.square().mean(-1, keepdim=True) + model.RMS_EPS)


class GPT(nn.Module):

  def __init__(self, config: ModelConfig):
    super().__init__()
    self.config = config
    self.wte = nn.Embedding(config.vocab_size, config.n_embd)
    self.wpe = nn.Embedding(config.block_size, config.n_embd)
    self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
    self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

  def forward(self, tokens_BxT: torch.Tensor) -> torch.Tensor:
    batch, t = tokens_BxT.shape
    x_BxTxD = self.wte(tokens_BxT) + self.wpe.weight[:t]
    x_NxD = x_BxTxD.reshape(batch * t, self.config.n_embd)
    for block in self.blocks:
      x_NxD = block(x_NxD, batch)
    return self.lm_head(x_NxD).view(batch, t, self.config.vocab_size)

  def load_jax_params(self, params) -> "GPT":
    """Copies a randygpt parameter pytree in (JAX's (in, out) matrices are transposed)."""
    def copy(target, value, transpose=True):
      value = torch.from_numpy(np.array(value))
      target.data.copy_(value.T if transpose else value)

    copy(self.wte.weight, params["wte"], transpose=False)
    copy(self.wpe.weight, params["wpe"], transpose=False)
    copy(self.lm_head.weight, params["lm_head"])
    attn, mlp = params["blocks"]["attn"], params["blocks"]["mlp"]  # Stacked by layer.
    for i, block in enumerate(self.blocks):
      copy(block.wqkv.weight, attn["wqkv"][i])
      copy(block.wo.weight, attn["wo"][i])
      copy(block.w1.weight, mlp["w1"][i])
      copy(block.w2.weight, mlp["w2"][i])
    return self


def make_optimizer(gpt: GPT, config: TrainConfig, fused: bool) -> torch.optim.Optimizer:
  """AdamW with randygpt's hyperparameters; no weight decay on the embeddings."""
  embeddings = {id(gpt.wte.weight), id(gpt.wpe.weight)}
  groups = [
      {"params": [p for p in gpt.parameters() if id(p) not in embeddings],
       "weight_decay": config.weight_decay},
      {"params": [gpt.wte.weight, gpt.wpe.weight], "weight_decay": 0.0},
  ]
  return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                           fused=fused, foreach=None if fused else True)


def train_step(gpt: GPT, optimizer: torch.optim.Optimizer, inputs_BxT: torch.Tensor,
               targets_BxT: torch.Tensor, grad_clip: float) -> torch.Tensor:
  logits_BxTxV = gpt(inputs_BxT)
  loss = F.cross_entropy(logits_BxTxV.flatten(0, 1), targets_BxT.flatten())
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(gpt.parameters(), grad_clip)
  optimizer.step()
  return loss


def measure(model_config: ModelConfig, train_config: TrainConfig, tokens: np.ndarray,
            steps: int, warmup_steps: int) -> dict:
  """ms per training step (median and p10-p90) of the faster AdamW implementation,
  on random windows of `tokens`, one thread per CPU this process may use (runtime/cores.py:
its affinity and cgroup quota, so a pinned peer does not oversubscribe its cores)."""
  torch.set_num_threads(cores.usable().cpus)
  torch.manual_seed(0)
  generator = np.random.default_rng(0)
  block, batch = model_config.block_size, train_config.batch_size
  corpus = torch.from_numpy(np.asarray(tokens, np.int64))

  def random_batch():
    starts = torch.from_numpy(generator.integers(0, len(corpus) - block - 1, batch))
    windows = torch.stack([corpus[s:s + block + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]

  results = {}
  for fused in (False, True):
    gpt = GPT(model_config).train()
    optimizer = make_optimizer(gpt, train_config, fused)
    seconds = []
    for i in range(warmup_steps + steps):
      inputs_BxT, targets_BxT = random_batch()
      start = time.perf_counter()
      train_step(gpt, optimizer, inputs_BxT, targets_BxT, train_config.grad_clip)
      if i >= warmup_steps:
        seconds.append(time.perf_counter() - start)
    results[fused] = 1e3 * np.percentile(seconds, [50, 10, 90])
  fused = bool(results[True][0] < results[False][0])
  ms, p10, p90 = results[fused]
  return {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
          "torch_adamw": "fused" if fused else "foreach", "torch_ms_per_step": ms,
          "torch_ms_per_step_p10": p10, "torch_ms_per_step_p90": p90,
          "torch_tokens_per_sec": batch * block / (ms / 1e3)}
