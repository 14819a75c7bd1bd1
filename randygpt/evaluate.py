"""Loss estimates: the mean loss over fixed random windows, on the evaluation device."""

import functools

import jax
import numpy as np

from randygpt import data, model, train
from randygpt.config import ModelConfig, TrainConfig
from randygpt.runtime import devices

# Tokens per loss-estimate chunk on the CPU: chunks past ~2K tokens fall out of cache and
# run 2.5x slower (docs/measurements.md, "Evaluation and generation"). Elsewhere a chunk's
# logits may take EVAL_CHUNK_BYTES: accelerators gain from large batches, and the bytes
# (tokens x vocabulary), not the tokens, are what must fit.
EVAL_CHUNK_TOKENS = {"cpu": 2048}
EVAL_CHUNK_BYTES = 64 << 20


def eval_loss(params, batch, *, model_config: ModelConfig, chunks: int = 1) -> jax.Array:
  """Mean loss over the windows of `batch = (inputs_BxT, targets_BxT)`, without dropout, in
  `chunks` equal chunks of consecutive windows run one after another (one chunk's
  activations in memory at a time)."""
  def chunk_loss(chunk):
    return model.loss_fn(params, chunk, model_config)
  in_chunks = jax.tree.map(lambda x_BxT: x_BxT.reshape(chunks, -1, x_BxT.shape[-1]), batch)
  return jax.lax.map(chunk_loss, in_chunks).mean()


def eval_chunks(tc: TrainConfig, model_config: ModelConfig, platform: str) -> int:
  """How many chunks an estimate runs in on `platform`: the fewest whose size fits the
  platform's limit, in whole batches of windows unless one batch's logits exceed
  EVAL_CHUNK_BYTES (a vocabulary of thousands), then in windows."""
  max_tokens_by_bytes = EVAL_CHUNK_BYTES // (4 * model_config.vocab_size)  # float32 logits.
  max_tokens = min(EVAL_CHUNK_TOKENS.get(platform, max_tokens_by_bytes), max_tokens_by_bytes)
  block, windows = model_config.block_size, tc.eval_iters * tc.batch_size
  unit = tc.batch_size if tc.batch_size * block <= max_tokens_by_bytes else 1
  per_chunk = unit * train.largest_fitting_divisor(windows // unit, unit * block, max_tokens)
  return windows // per_chunk


def eval_chunk_tokens(tc: TrainConfig, model_config: ModelConfig, platform: str) -> int:
  """Tokens in one chunk of an estimate on `platform`."""
  windows = tc.eval_iters * tc.batch_size
  return windows * model_config.block_size // eval_chunks(tc, model_config, platform)


def jit_eval_loss(tc: TrainConfig, model_config: ModelConfig, platform: str):
  """The jitted loss estimate, in chunks as large as suit `platform`."""
  return jax.jit(functools.partial(eval_loss, model_config=model_config,
                                   chunks=eval_chunks(tc, model_config, platform)))


class Evaluator:
  """Estimates the train and val loss of some parameters on `device`, over the same
  windows every time (gathered once), so that estimates are comparable."""

  def __init__(self, device: jax.Device, splits: dict[str, np.ndarray], key: jax.Array,
               tc: TrainConfig, model_config: ModelConfig):
    self.device = device
    self._estimate = jit_eval_loss(tc, model_config, device.platform)
    n, block = tc.eval_iters * tc.batch_size, model_config.block_size
    self._batches = {  # The key's stream 0 draws the train windows, 1 the val windows.
        name: jax.device_put(data.windows(splits[name], data.window_starts(
            jax.random.fold_in(key, index), n, len(splits[name]), block), block), device)
        for index, name in enumerate(("train", "val"))}

  def place(self, tree):
    """`tree`, replicated over the training devices, copied to the evaluation device."""
    return jax.device_put(devices.local_copy(tree), self.device)

  def __call__(self, params) -> dict[str, float]:
    """{"eval_train_loss", "val_loss"} of the training devices' `params`."""
    params = self.place(params)
    return {"eval_train_loss": float(self._estimate(params, self._batches["train"])),
            "val_loss": float(self._estimate(params, self._batches["val"]))}
