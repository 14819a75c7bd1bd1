"""Loss estimates and samples on the evaluation device, and the CPU's taking over when an
accelerator fails there: at the start-up probe, or at any estimate or sample later."""

import dataclasses
import functools

import jax
import numpy as np

from randygpt import data, generate, model, train
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt.runtime import devices, platforms

# Tokens per loss-estimate chunk. Accelerators gain from large batches; on the CPU, chunks
# past ~2K tokens fall out of cache and run 2.5x slower (docs/measurements.md, "Evaluation
# and generation").
EVAL_CHUNK_TOKENS = {"cpu": 2048, "accelerator": 262144}
# The start-up probe's input: an estimate over a few windows, a few tokens of the sampler.
PROBE_WINDOWS, PROBE_NEW_TOKENS = 2, 4
# How far the probe's estimate may be from the CPU's, relative: a GPU's TF32 products move
# a loss by ~1e-4; a broken operation by far more.
PROBE_RTOL = 1e-3


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


def chunk_batches(tc: TrainConfig, model_config: ModelConfig, platform: str) -> int:
  """Batches per chunk of an estimate: as many as suit `platform`."""
  max_tokens = EVAL_CHUNK_TOKENS.get(platform, EVAL_CHUNK_TOKENS["accelerator"])
  return train.largest_fitting_divisor(
      tc.eval_iters, tc.batch_size * model_config.block_size, max_tokens)


def jit_eval_loss(tc: TrainConfig, model_config: ModelConfig, platform: str,
                  chunk: int | None = None):
  """The jitted loss estimate, in chunks of `chunk` batches (default: as large as suit
  `platform`)."""
  return jax.jit(functools.partial(
      eval_loss, model_config=model_config, batch_size=tc.batch_size,
      eval_iters=tc.eval_iters,
      chunk_batches=chunk or chunk_batches(tc, model_config, platform)))


class Evaluator:
  """Estimates the train and val loss of some parameters over the same windows every time,
  so that estimates are comparable, and draws samples, on the evaluation device.

  An accelerator runs a probe of both at the start (`probe`). One that fails later hands
  the work to the CPU, which redoes it and does all the rest (`_guarded`): one warning
  line, and `fallback` says what happened. Without `splits` it only samples."""

  def __init__(self, device: jax.Device, model_config: ModelConfig,
               sample_config: SampleConfig, splits: dict[str, np.ndarray] | None = None,
               key: jax.Array | None = None, tc: TrainConfig | None = None):
    self.model_config, self.sample_config, self.tc = model_config, sample_config, tc
    self._splits = splits
    # Held on the CPU, from where every device it moves to gets its copy.
    self._key = None if key is None else jax.device_put(key, platforms.cpu_device())
    self._inputs = (None, None)  # (device, its copies of the splits and the key)
    self.fallback = None  # {"backend", "error", "during"} once the CPU has taken over.
    self._use(device)

  def _use(self, device: jax.Device, chunk: int | None = None) -> None:
    """Works on `device` from now on, in chunks of `chunk` batches (default: its own)."""
    self.device = device
    if self.tc is not None:
      self.chunk = chunk or chunk_batches(self.tc, self.model_config, device.platform)
      self._estimate = jit_eval_loss(self.tc, self.model_config, device.platform, self.chunk)

  @property
  def on_accelerator(self) -> bool:
    """Whether there is a CPU to fall back to."""
    return self.device != platforms.cpu_device()

  def place(self, tree):
    """`tree`, replicated over the training devices (or on any one device), copied to the
    evaluation device."""
    return jax.device_put(devices.local_copy(tree), self.device)

  def _tokens_and_key(self):
    """The splits and the key on the evaluation device, copied there on first use."""
    if self._inputs[0] != self.device:
      self._inputs = (self.device, jax.device_put((self._splits, self._key), self.device))
    return self._inputs[1]

  def __call__(self, params) -> dict[str, float]:
    """{"eval_train_loss", "val_loss"} of the training devices' `params`."""
    return self._guarded("estimate", "evaluation", functools.partial(self._estimates, params))

  def _estimates(self, params) -> dict[str, float]:
    params, (tokens, key) = self.place(params), self._tokens_and_key()
    return {name: float(self._estimate(params, tokens[split], jax.random.fold_in(key, index)))
            for name, split, index in (("eval_train_loss", "train", 0), ("val_loss", "val", 1))}

  def write_samples(self, params, tokenizer: data.CharTokenizer, prompts, seed: int,
                    path=None, stop=None) -> None:
    """generate.write_samples of `params` (anywhere), each prompt's batch drawn here."""
    placed = {}  # `params` on each device that samples, copied there on first use.

    def on_device():
      if self.device not in placed:
        placed[self.device] = self.place(params)
      return placed[self.device]

    def complete(prompt: str, key: jax.Array) -> list[str]:
      return self._guarded("sample", "sampling", lambda: generate.complete(
          on_device(), tokenizer, prompt, key, self.model_config, self.sample_config))
    generate.write_samples(complete, prompts, seed, path, stop)

  def _guarded(self, what: str, during: str, work):
    """`work()` on the evaluation device. An accelerator that fails hands it to the CPU,
    which redoes it and does all later work, with one warning line. When the CPU fails
    too, the accelerator's error is raised: the fallback hides no bug."""
    if not self.on_accelerator:
      return work()
    try:
      return self._on_accelerator(what, work)
    except Exception as error:  # Plugins raise assorted types (XlaRuntimeError, RuntimeError...).
      name = platforms.device_name(self.device)
      self._give_up(error, during)
      print(f"⚠ {name} failed during {during} ({self.fallback['error']}); evaluating and "
            "sampling on CPU from here on.", flush=True)
      try:
        return work()
      except Exception:
        raise error

  def _on_accelerator(self, what: str, work):
    """`work()` through the tests' seam; an estimate that runs out of memory is retried in
    chunks half as large, down to one batch a chunk."""
    while True:
      try:
        return platforms.SEAM.hook(what, work)
      except Exception as error:
        if what != "estimate" or self.chunk == 1 or not platforms.is_out_of_memory(error):
          raise
        self._use(self.device, train.largest_fitting_divisor(self.tc.eval_iters, 1,
                                                             self.chunk // 2))

  def _give_up(self, error: Exception, during: str) -> None:
    """The CPU does the work from now on; `fallback` records why."""
    self.fallback = {"backend": f"{self.device.platform}:{self.device.id}",
                     "error": platforms.error_line(error), "during": during}
    self._use(platforms.cpu_device())

  def probe(self, params, placement: platforms.Placement) -> platforms.Placement:
    """Runs what the run will run on an accelerator, at the start: a loss estimate of a few
    windows, checked against the CPU's, and a few sampled tokens, through the run's jitted
    functions at its model's shapes. On an error or a wrong number the CPU takes over from the
    start: returns the placement that says so (else `placement`)."""
    if not self.on_accelerator:
      return placement
    try:
      if self.tc is not None:
        self._probe_estimate(params)
      self._probe_sample(params)
    except Exception as error:  # As in _guarded.
      self._give_up(error, "start-up probe")
      return placement.eval_on_cpu(self.fallback["error"])
    return placement

  def _probe_estimate(self, params) -> None:
    one_batch = dataclasses.replace(self.tc, eval_iters=1,
                                    batch_size=min(self.tc.batch_size, PROBE_WINDOWS))
    # One chunk on any platform: one function, traced once for both devices.
    fn = jit_eval_loss(one_batch, self.model_config, self.device.platform)

    def estimate(device: jax.Device, tokens, key) -> float:
      return float(fn(jax.device_put(devices.local_copy(params), device), tokens,
                      jax.random.fold_in(key, 1)))

    def on_accelerator() -> float:
      tokens, key = self._tokens_and_key()
      return estimate(self.device, tokens["val"], key)
    got = platforms.SEAM.hook("probe-estimate", on_accelerator)
    cpu = platforms.cpu_device()
    want = estimate(cpu, jax.device_put(self._splits["val"], cpu), self._key)
    if not abs(got - want) <= PROBE_RTOL * abs(want):  # NaN fails too.
      raise ValueError(f"its loss estimate {got:.6g} is not the CPU's {want:.6g}")

  def _probe_sample(self, params) -> None:
    config = dataclasses.replace(self.sample_config, max_new_tokens=PROBE_NEW_TOKENS,
                                 num_samples=1)
    with jax.default_device(platforms.cpu_device()):
      key = jax.random.key(0)

    def draw():
      return np.asarray(generate.generate(self.place(params), np.zeros((1, 1), np.int32), key,
                                          self.model_config, config))
    tokens = platforms.SEAM.hook("probe-sample", draw)
    if not ((tokens >= 0) & (tokens < self.model_config.vocab_size)).all():
      raise ValueError("its sampler drew tokens outside the vocabulary")
