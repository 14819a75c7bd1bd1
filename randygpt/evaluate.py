"""Loss estimates and samples on the evaluation device, and the CPU's taking over when an
accelerator fails there: at the start-up probe, or at any estimate or sample later."""

import dataclasses
import functools

import jax
import numpy as np

from randygpt import data, generate, model, train
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt.runtime import devices, platforms

# Tokens per loss-estimate chunk on the CPU: chunks past ~2K tokens fall out of cache and
# run 2.5x slower (docs/measurements.md, "Evaluation and generation"). Elsewhere a chunk's
# logits may take EVAL_CHUNK_BYTES: accelerators gain from large batches, and the bytes
# (tokens x vocabulary), not the tokens, are what must fit.
EVAL_CHUNK_TOKENS = {"cpu": 2048}
EVAL_CHUNK_BYTES = 64 << 20
# The start-up probe's input: an estimate over a few windows, a few tokens of the sampler.
PROBE_WINDOWS, PROBE_NEW_TOKENS = 2, 4
# How far the probe's estimate may be from the CPU's, relative: a GPU's TF32 products move
# a loss by ~1e-4; a broken operation by far more.
PROBE_RTOL = 1e-3


def eval_loss(params, batch, *, model_config: ModelConfig, chunks: int = 1) -> jax.Array:
  """Mean loss over the windows of `batch = (inputs_BxT, targets_BxT)`, without dropout, in
  `chunks` equal chunks of consecutive windows run one after another (one chunk's
  activations in memory at a time)."""
  def chunk_loss(chunk):
    return model.loss_fn(params, chunk, model_config)
  in_chunks = jax.tree.map(lambda x_BxT: x_BxT.reshape(chunks, -1, x_BxT.shape[-1]), batch)
  return jax.lax.map(chunk_loss, in_chunks).mean()


def eval_windows(tc: TrainConfig) -> int:
  """Windows in each of an estimate's two splits."""
  return tc.eval_iters * tc.batch_size


def eval_chunks(tc: TrainConfig, model_config: ModelConfig, platform: str) -> int:
  """How many chunks an estimate runs in on `platform`: the fewest whose size fits the
  platform's limit, in whole batches of windows unless one batch's logits exceed
  EVAL_CHUNK_BYTES (a vocabulary of thousands), then in windows."""
  max_tokens_by_bytes = EVAL_CHUNK_BYTES // (4 * model_config.vocab_size)  # float32 logits.
  max_tokens = min(EVAL_CHUNK_TOKENS.get(platform, max_tokens_by_bytes), max_tokens_by_bytes)
  block, windows = model_config.block_size, eval_windows(tc)
  unit = tc.batch_size if tc.batch_size * block <= max_tokens_by_bytes else 1
  per_chunk = unit * train.largest_fitting_divisor(windows // unit, unit * block, max_tokens)
  return windows // per_chunk


def eval_chunk_tokens(tc: TrainConfig, model_config: ModelConfig, platform: str) -> int:
  """Tokens in one chunk of an estimate on `platform`."""
  return eval_windows(tc) * model_config.block_size // eval_chunks(tc, model_config, platform)


def jit_eval_loss(tc: TrainConfig, model_config: ModelConfig, platform: str,
                  chunks: int | None = None):
  """The jitted loss estimate, in `chunks` chunks (default: as few as suit `platform`)."""
  return jax.jit(functools.partial(
      eval_loss, model_config=model_config,
      chunks=chunks or eval_chunks(tc, model_config, platform)))


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
    # The windows of every estimate, gathered once on the host (the key's stream 0 draws the
    # train windows, 1 the val windows), from where each device it uses gets its copy.
    self._windows = None if splits is None else {
        name: data.windows(splits[name], data.window_starts(
            jax.random.fold_in(key, index), eval_windows(tc), len(splits[name]),
            model_config.block_size), model_config.block_size)
        for index, name in enumerate(("train", "val"))}
    self._inputs = (None, None)  # (device, its copy of the windows)
    self.fallback = None  # {"backend", "error", "during"} once the CPU has taken over.
    self._use(device)

  def _use(self, device: jax.Device, chunks: int | None = None) -> None:
    """Works on `device` from now on, in `chunks` chunks (default: its own)."""
    self.device = device
    if self.tc is not None:
      self.chunks = chunks or eval_chunks(self.tc, self.model_config, device.platform)
      self._estimate = jit_eval_loss(self.tc, self.model_config, device.platform, self.chunks)

  @property
  def on_accelerator(self) -> bool:
    """Whether there is a CPU to fall back to."""
    return self.device != platforms.cpu_device()

  def place(self, tree):
    """`tree`, replicated over the training devices (or on any one device), copied to the
    evaluation device."""
    return jax.device_put(devices.local_copy(tree), self.device)

  def _windows_here(self) -> dict:
    """The windows on the evaluation device, copied there on first use."""
    if self._inputs[0] != self.device:
      self._inputs = (self.device, jax.device_put(self._windows, self.device))
    return self._inputs[1]

  def __call__(self, params) -> dict[str, float]:
    """{"eval_train_loss", "val_loss"} of the training devices' `params`."""
    return self._guarded("estimate", "evaluation", functools.partial(self._estimates, params))

  def _estimates(self, params) -> dict[str, float]:
    params, windows = self.place(params), self._windows_here()
    return {name: float(self._estimate(params, windows[split]))
            for name, split in (("eval_train_loss", "train"), ("val_loss", "val"))}

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
    chunks half as large, down to one window a chunk."""
    windows = 0 if self.tc is None else eval_windows(self.tc)
    while True:
      try:
        return platforms.SEAM.hook(what, work)
      except Exception as error:
        per_chunk = windows // self.chunks if what == "estimate" else 1
        if per_chunk == 1 or not platforms.is_out_of_memory(error):
          raise
        self._use(self.device,
                  windows // train.largest_fitting_divisor(windows, 1, per_chunk // 2))

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
    # One chunk on any platform: one function, traced once for both devices.
    fn = jax.jit(functools.partial(eval_loss, model_config=self.model_config))
    few = jax.tree.map(lambda x_BxT: x_BxT[:PROBE_WINDOWS], self._windows["val"])

    def estimate(device: jax.Device) -> float:
      return float(fn(jax.device_put(devices.local_copy(params), device),
                      jax.device_put(few, device)))
    got = platforms.SEAM.hook("probe-estimate", lambda: estimate(self.device))
    want = estimate(platforms.cpu_device())
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
