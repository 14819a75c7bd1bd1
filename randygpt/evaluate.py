"""Loss estimates and samples on one evaluation device.

The estimates run over the same windows every time, so that they are comparable. Which
device, in how many chunks, and what happens when an accelerator fails there is decided
outside the research core (runtime/placement.py, runtime/fallback.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from randygpt import data, generate, model, sharding
from randygpt.config import ModelConfig, SampleConfig, TrainConfig


# The final evaluation's cap: the windows of this many estimates (a big text's val split holds
# millions of windows; Tiny Shakespeare's 1,742 are 1.4 estimates' worth at the default shape).
FULL_VAL_ESTIMATES = 64


def eval_loss(params, batch, *, model_config: ModelConfig, chunks: int = 1) -> jax.Array:
  """Mean loss over the windows of `batch = (inputs_BxT, targets_BxT)`, without dropout, in
  `chunks` equal chunks of consecutive windows run one after another (one chunk's
  activations in memory at a time)."""
  def chunk_loss(chunk):
    return model.loss_fn(params, chunk, model_config)
  in_chunks = jax.tree.map(lambda x_BxT: x_BxT.reshape(chunks, -1, x_BxT.shape[-1]), batch)
  return jax.lax.map(chunk_loss, in_chunks).mean()


def eval_loss_sum(params, batch, valid_B, *, model_config: ModelConfig,
                  chunks: int = 1) -> jax.Array:
  """The sum of the mean losses of the windows of `batch` where `valid_B` is true (the rest
  pad a batch to its compiled size), in `chunks` chunks as eval_loss."""
  def chunk_sum(chunk):
    (inputs_BxT, targets_BxT), valid_B = chunk
    logits_BxTxV = model.forward(params, inputs_BxT, model_config)
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    return jnp.where(valid_B, losses_BxT.mean(axis=-1), 0.0).sum()
  in_chunks = jax.tree.map(lambda x: x.reshape(chunks, -1, *x.shape[1:]), (batch, valid_B))
  return jax.lax.map(chunk_sum, in_chunks).sum()


def tiling_starts(n_tokens: int, block_size: int, limit: int) -> np.ndarray:
  """The starts of the non-overlapping windows that tile a split, at most `limit` of them
  (spread evenly over it when there are more)."""
  starts = np.arange(0, n_tokens - block_size, block_size)
  if len(starts) > limit:
    starts = starts[np.linspace(0, len(starts) - 1, limit).round().astype(np.int64)]
  return starts


def eval_windows(tc: TrainConfig) -> int:
  """Windows in each of an estimate's two splits."""
  return tc.eval_iters * tc.batch_size


def jit_eval_loss(model_config: ModelConfig, chunks: int = 1):
  """The jitted loss estimate, in `chunks` chunks."""
  return jax.jit(functools.partial(eval_loss, model_config=model_config, chunks=chunks))


class Evaluator:
  """Estimates the train and val loss of some parameters, and draws samples, on `device`,
  an estimate in `chunks` chunks. Without `splits` it only samples."""

  def __init__(self, device: jax.Device, model_config: ModelConfig,
               sample_config: SampleConfig, splits: dict[str, np.ndarray] | None = None,
               key: jax.Array | None = None, tc: TrainConfig | None = None, chunks: int = 1):
    self.run_config, self.sample_config, self.tc = model_config, sample_config, tc
    self.splits = splits
    # The windows of every estimate, gathered once on the host (the key's stream 0 draws the
    # train windows, 1 the val windows), from where each device it uses gets its copy.
    self.windows = None if splits is None else {
        name: data.windows(splits[name], data.window_starts(
            jax.random.fold_in(key, index), eval_windows(tc), len(splits[name]),
            model_config.block_size), model_config.block_size)
        for index, name in enumerate(("train", "val"))}
    self._inputs = (None, None)  # (device, its copy of the windows)
    self.use(device, chunks)

  def use(self, device: jax.Device, chunks: int = 1) -> None:
    """Works on `device` from now on, in `chunks` chunks (the run's model as its platform
    runs it: model.on_platform)."""
    self.device, self.chunks = device, chunks
    self.model_config = model.on_platform(self.run_config, device.platform)
    self._estimate, self._loss_sum = jit_eval_loss(self.model_config, chunks), None

  def place(self, tree):
    """`tree`, replicated over the training devices (or on any one device), copied to the
    evaluation device."""
    return jax.device_put(sharding.local_copy(tree), self.device)

  def _windows_here(self) -> dict:
    """The windows on the evaluation device, copied there on first use."""
    if self._inputs[0] != self.device:
      self._inputs = (self.device, jax.device_put(self.windows, self.device))
    return self._inputs[1]

  def estimates(self, params) -> dict[str, float]:
    """{"eval_train_loss", "val_loss"} of the training devices' `params`."""
    params, windows = self.place(params), self._windows_here()
    return {name: float(self._estimate(params, windows[split]))
            for name, split in (("eval_train_loss", "train"), ("val_loss", "val"))}

  def full_val_starts(self) -> np.ndarray:
    """The starts of the windows of the final evaluation (full_val_loss)."""
    return tiling_starts(len(self.splits["val"]), self.model_config.block_size,
                         FULL_VAL_ESTIMATES * 2 * eval_windows(self.tc))

  def full_val_loss(self, params) -> tuple[float, int]:
    """The val loss over the non-overlapping windows that tile the val split (at most
    FULL_VAL_ESTIMATES estimates' worth), every window once, and their count; in batches of
    an estimate's windows."""
    size, block = eval_windows(self.tc), self.model_config.block_size
    starts, params, total = self.full_val_starts(), self.place(params), 0.0
    if self._loss_sum is None:
      self._loss_sum = jax.jit(functools.partial(eval_loss_sum, model_config=self.model_config,
                                                 chunks=self.chunks))
    for first in range(0, len(starts), size):
      batch = starts[first:first + size]
      valid_B = np.arange(size) < len(batch)
      padded = np.concatenate([batch, np.zeros(size - len(batch), np.int64)])
      windows = data.windows(self.splits["val"], padded, block)
      total += float(self._loss_sum(params, jax.device_put(windows, self.device),
                                    jax.device_put(valid_B, self.device)))
    return total / len(starts), len(starts)

  def complete(self, params, tokenizer: data.CharTokenizer, prompt: str,
               key: jax.Array) -> list[str]:
    """Samples of `prompt` from `params` (already on this device): generate.complete."""
    return generate.complete(params, tokenizer, prompt, key, self.model_config,
                             self.sample_config)
