"""Loss estimates: the mean loss over fixed random windows, on the evaluation device."""

import functools

import jax
import numpy as np

from randygpt import data, model, train
from randygpt.config import ModelConfig, TrainConfig
from randygpt.runtime import devices

# Tokens per loss-estimate chunk. Accelerators gain from large batches; on the CPU, chunks
# past ~2K tokens fall out of cache and run 2.5x slower (docs/measurements.md, "Evaluation
# and generation").
EVAL_CHUNK_TOKENS = {"cpu": 2048, "accelerator": 262144}


def eval_loss(params, tokens: jax.Array, key: jax.Array, *, model_config: ModelConfig,
              batch_size: int, eval_iters: int, chunk_batches: int = 1) -> jax.Array:
  """Mean loss over `eval_iters` batches of random windows, without dropout, run
  `chunk_batches` batches at a time (a divisor of `eval_iters`), one chunk in memory at a
  time. The windows, and so the estimate, do not depend on the chunking."""
  block = model_config.block_size
  starts = data.window_starts(tokens, key, eval_iters * batch_size, block)

  def chunk_loss(starts_B):
    return model.loss_fn(params, data.windows(tokens, starts_B, block), model_config)
  return jax.lax.map(chunk_loss, starts.reshape(eval_iters // chunk_batches, -1)).mean()


def jit_eval_loss(tc: TrainConfig, model_config: ModelConfig, platform: str):
  """The jitted loss estimate, in chunks as large as suit `platform`."""
  max_tokens = EVAL_CHUNK_TOKENS.get(platform, EVAL_CHUNK_TOKENS["accelerator"])
  chunk = train.largest_fitting_divisor(
      tc.eval_iters, tc.batch_size * model_config.block_size, max_tokens)
  return jax.jit(functools.partial(eval_loss, model_config=model_config,
                                   batch_size=tc.batch_size, eval_iters=tc.eval_iters,
                                   chunk_batches=chunk))


class Evaluator:
  """Estimates the train and val loss of some parameters on `device`, over the same
  windows every time, so that estimates are comparable."""

  def __init__(self, device: jax.Device, splits: dict[str, np.ndarray], key: jax.Array,
               tc: TrainConfig, model_config: ModelConfig):
    self.device = device
    self._estimate = jit_eval_loss(tc, model_config, device.platform)
    self._tokens = jax.device_put(splits, device)
    self._key = jax.device_put(key, device)

  def place(self, tree):
    """`tree`, replicated over the training devices, copied to the evaluation device."""
    return jax.device_put(devices.local_copy(tree), self.device)

  def __call__(self, params) -> dict[str, float]:
    """{"eval_train_loss", "val_loss"} of the training devices' `params`."""
    params = self.place(params)
    return {"eval_train_loss": self._loss(params, "train", 0),
            "val_loss": self._loss(params, "val", 1)}

  def _loss(self, params, split: str, index: int) -> float:
    return float(self._estimate(params, self._tokens[split],
                                jax.random.fold_in(self._key, index)))
