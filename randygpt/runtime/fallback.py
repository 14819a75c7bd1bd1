"""Evaluation on an accelerator, and the CPU's taking over when it fails there: at the
start-up probe, or at any estimate or sample later. One warning line, never a traceback;
`fallback` says what happened.

Every piece of work sent to an accelerator goes through an executor, `executor(what, work)`
(`what`: "probe-estimate", "probe-sample", "estimate", "sample", "initial-state" or
"train-step"), which returns `work()`. The run's is `run_plainly`; tests pass one that fails.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from randygpt import evaluate, generate, sharding
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt.runtime import placement, platforms

# The start-up probe's input: an estimate over a few windows, a few tokens of the sampler.
PROBE_WINDOWS, PROBE_NEW_TOKENS = 2, 4
# How far the probe's estimate may be from the CPU's float32 one, relative: a GPU's TF32
# products move a loss by ~1e-4, bfloat16 matmuls (--compute_dtype) by ~1e-3; a broken
# operation by far more.
PROBE_RTOL = {"float32": 1e-3, "bfloat16": 1e-2}

Executor = Callable[[str, Callable[[], Any]], Any]


def run_plainly(what: str, work: Callable[[], Any]) -> Any:
  del what
  return work()


def on_training_devices(placement: platforms.Placement, executor: Executor, what: str,
                        work: Callable[[], Any]) -> Any:
  """`work()`, through `executor` when the training devices are an accelerator's."""
  return executor(what, work) if placement.train_on_accelerator else work()


class GuardedEvaluator:
  """An `evaluate.Evaluator` whose work on an accelerator goes through `executor`. An
  accelerator that fails hands the work to the CPU, which redoes it and does all the rest;
  an estimate that runs out of memory is first retried in chunks half as large."""

  def __init__(self, device: jax.Device, model_config: ModelConfig,
               sample_config: SampleConfig, splits: dict[str, np.ndarray] | None = None,
               key: jax.Array | None = None, tc: TrainConfig | None = None,
               executor: Executor = run_plainly, platform: str | None = None):
    self.tc, self.executor = tc, executor
    self.platform = platform or device.platform  # The device's JAX platform (Placement's).
    self.evaluator = evaluate.Evaluator(device, model_config, sample_config, splits, key, tc,
                                        self._chunks_on(self.platform, model_config))
    self.fallback = None  # {"backend", "error", "during"} once the CPU has taken over.

  def _chunks_on(self, platform: str, model_config: ModelConfig) -> int:
    return 1 if self.tc is None else placement.eval_chunks(self.tc, model_config, platform)

  @property
  def device(self) -> jax.Device:
    return self.evaluator.device

  @property
  def on_accelerator(self) -> bool:
    """Whether there is a CPU to fall back to."""
    return self.device != platforms.cpu_device()

  def __call__(self, params) -> dict[str, float]:
    """{"eval_train_loss", "val_loss"} of the training devices' `params`."""
    return self._guarded("estimate", "evaluation",
                         functools.partial(self.evaluator.estimates, params))

  def full_val(self, params) -> tuple[float, int]:
    """evaluate.Evaluator.full_val_loss of the training devices' `params`."""
    return self._guarded("estimate", "evaluation",
                         functools.partial(self.evaluator.full_val_loss, params))

  def write_samples(self, params, tokenizer, prompts, seed: int, path=None, stop=None) -> None:
    """generate.write_samples of `params` (anywhere), each prompt's batch drawn here."""
    placed = {}  # `params` on each device that samples, copied there on first use.

    def on_device():
      if self.device not in placed:
        placed[self.device] = self.evaluator.place(params)
      return placed[self.device]

    def complete(prompt: str, key: jax.Array) -> list[str]:
      return self._guarded("sample", "sampling", lambda: self.evaluator.complete(
          on_device(), tokenizer, prompt, key))
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
      name = platforms.device_name(self.device, self.platform)
      self._give_up(error, during)
      print(f"⚠ {name} failed during {during} ({self.fallback['error']}); evaluating and "
            "sampling on CPU from here on.", flush=True)
      try:
        return work()
      except Exception:
        raise error

  def _on_accelerator(self, what: str, work):
    """`work()` through the executor; an estimate that runs out of memory is retried in
    chunks half as large, down to one window a chunk."""
    while True:
      try:
        return self.executor(what, work)
      except Exception as error:
        smaller = (placement.smaller_eval_chunks(self.tc, self.evaluator.chunks)
                   if what == "estimate" else None)
        if smaller is None or not platforms.is_out_of_memory(error):
          raise
        self.evaluator.use(self.device, smaller)

  def _give_up(self, error: Exception, during: str) -> None:
    """The CPU does the work from now on; `fallback` records why."""
    self.fallback = {"backend": f"{self.platform}:{self.device.id}",
                     "error": platforms.error_line(error), "during": during}
    self.platform = "cpu"
    self.evaluator.use(platforms.cpu_device(), self._chunks_on("cpu",
                                                               self.evaluator.model_config))

  def probe(self, params, chosen: platforms.Placement) -> platforms.Placement:
    """Runs what the run will run on an accelerator, at the start: a loss estimate of a few
    windows, checked against the CPU's, and a few sampled tokens, through the run's jitted
    functions at its model's shapes. On an error or a wrong number the CPU takes over from the
    start: returns the placement that says so (else `chosen`)."""
    if not self.on_accelerator:
      return chosen
    try:
      if self.tc is not None:
        self._probe_estimate(params)
      self._probe_sample(params)
    except Exception as error:  # As in _guarded.
      self._give_up(error, "start-up probe")
      return chosen.eval_on_cpu(self.fallback["error"])
    return chosen

  def _probe_estimate(self, params) -> None:
    # One chunk on either device: the accelerator's computation, and the CPU's float32 one.
    here = self.evaluator.model_config
    exact = dataclasses.replace(here, compute_dtype="float32", attention="einsum")
    few = jax.tree.map(lambda x_BxT: x_BxT[:PROBE_WINDOWS], self.evaluator.windows["val"])

    def estimate(device: jax.Device, model_config: ModelConfig) -> float:
      return float(evaluate.jit_eval_loss(model_config)(
          jax.device_put(sharding.local_copy(params), device), jax.device_put(few, device)))
    got = self.executor("probe-estimate", lambda: estimate(self.device, here))
    want = estimate(platforms.cpu_device(), exact)
    rtol = PROBE_RTOL.get(here.compute_dtype, PROBE_RTOL["float32"])
    if not abs(got - want) <= rtol * abs(want):  # NaN fails too.
      raise ValueError(f"its loss estimate {got:.6g} is not the CPU's {want:.6g}")

  def _probe_sample(self, params) -> None:
    model_config = self.evaluator.model_config
    config = dataclasses.replace(self.evaluator.sample_config,
                                 max_new_tokens=PROBE_NEW_TOKENS, num_samples=1)
    with jax.default_device(platforms.cpu_device()):
      key = jax.random.key(0)

    def draw():
      return np.asarray(generate.generate(self.evaluator.place(params), np.zeros((1, 1), np.int32),
                                          key, model_config, config))
    tokens = self.executor("probe-sample", draw)
    if not ((tokens >= 0) & (tokens < model_config.vocab_size)).all():
      raise ValueError("its sampler drew tokens outside the vocabulary")
