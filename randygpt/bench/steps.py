"""The one-shape report's in-process numbers: the jitted train step (compile time, ms/step,
tokens/s, MFU against a measured matmul peak), the loss estimate and generation."""

import dataclasses
import functools
import time

from randygpt.bench.checkpoints import measure_checkpoints
from randygpt.bench.peers import check_torch_comparable, torch_reference_timing
from randygpt.bench.timing import percentile, timed
from randygpt.runtime import memory

GENERATION_STREAMS = 8  # Parallel samples in the batched generation timing.
LONG_GENERATION = 500  # New tokens in the generation timing that runs past the window.


@dataclasses.dataclass
class Prepared:
  """What the bench times, made by the run's own code (trainer.py)."""
  config: object  # The resolved RunConfig: vocabulary and placement filled in.
  plan: object  # runtime.placement.Plan
  state: dict
  step_fn: object  # The jitted train step, before compiling.
  batch: object  # The run's first batch, on the training devices.
  rng: object  # The run's dropout key.
  tokens: object

  def compile(self):
    """The step compiled as a run compiles it (its lowering kept between runs)."""
    from randygpt import trainer
    return trainer.compile_step(self.step_fn, self.config, self.state, self.batch, self.rng)


def prepare_step(config) -> Prepared:
  """The bench's data, devices, initial state, train step and the run's first batch: the step
  a run of `config` executes."""
  from randygpt import train, trainer
  corpus, splits = trainer.read_text(config)
  config, plan = trainer.resolve(config, corpus.tokenizer.vocab_size, resumed=False)
  state, sampler, step_fn = trainer.build_step(config, plan, splits)
  return Prepared(config, plan, state, step_fn, trainer.place_batch(sampler(1), plan.mesh),
                  trainer.stream_key(config, train.DROPOUT_STREAM), corpus.tokens)


def measure_steps(step, state, batch, steps: int, warmup_steps: int):
  """Seconds of each of `steps` timed train steps after `warmup_steps` untimed ones, with
  the memory compiling left behind released first, as the training loop does."""
  import jax
  for i in range(warmup_steps):
    state, _ = step(state, batch, jax.random.key(i))
  memory.release_free_memory()
  step_seconds = []
  for i in range(steps):
    (state, _), seconds = timed(step, state, batch, jax.random.key(i))
    step_seconds.append(seconds)
  return state, step_seconds


def measure_peak_gflops(mesh, n: int = 2048) -> float:
  """f32 GFLOP/s of an n x n x n matmul split across the training devices (best of 5)."""
  import jax
  import jax.numpy as jnp

  from randygpt import sharding
  a = jax.device_put(jnp.ones((n, n)), sharding.batch_sharded(mesh))
  b = jax.device_put(jnp.ones((n, n)), sharding.replicated(mesh))
  matmul = jax.jit(jnp.matmul)
  timed(matmul, a, b)
  return 2 * n**3 / min(timed(matmul, a, b)[1] for _ in range(5)) / 1e9


def measure_generation(params, model_config, sample_config) -> dict:
  """Generated tokens/s (all streams together) for 1 and GENERATION_STREAMS streams: within
  the context window with and without the key/value cache, and for LONG_GENERATION tokens."""
  import jax
  import numpy as np

  from randygpt import generate

  results = {}
  for streams in (1, GENERATION_STREAMS):
    prompt_BxP = np.zeros((streams, 1), np.int32)
    cases = {"window_cached": (model_config.block_size, True),
             "window_uncached": (model_config.block_size, False),
             f"{LONG_GENERATION}_cached": (LONG_GENERATION, True)}
    for name, (n_new, use_cache) in cases.items():
      config = dataclasses.replace(sample_config, max_new_tokens=n_new)
      run = functools.partial(generate.generate, params, prompt_BxP, model_config=model_config,
                              sample_config=config, use_cache=use_cache)
      timed(run, jax.random.key(0))  # Compiles.
      seconds = min(timed(run, jax.random.key(i))[1] for i in range(1, 4))
      results[f"generate_{name}_x{streams}_tokens_per_sec"] = streams * n_new / seconds
  return results


def measure_eval_and_generation(params, tokens, placement, tc, model_config, sample) -> dict:
  """Loss-estimate throughput and generation speed on the evaluation device."""
  import jax

  from randygpt.runtime import fallback
  evaluator = fallback.GuardedEvaluator(placement.eval_device, model_config, sample,
                                        {"train": tokens, "val": tokens}, jax.random.key(3), tc)
  evaluator(params)  # Compiles.
  _, eval_s = timed(evaluator, params)
  tokens_per_step = tc.batch_size * model_config.block_size
  return {"eval_tokens_per_sec": 2 * tc.eval_iters * tokens_per_step / eval_s,
          **measure_generation(evaluator.evaluator.place(params), model_config, sample)}


def measure(config, *, steps: int, warmup_steps: int, saves: int, with_torch: bool,
            peak_gflops: float) -> dict:
  """The one-shape report's numbers, keyed as --json prints them."""
  from randygpt import model
  if with_torch:
    check_torch_comparable(config)
  prepared = prepare_step(config)
  model_config, tc = prepared.config.model, prepared.config.train
  placement, mesh, state, batch = (prepared.plan.placement, prepared.plan.mesh, prepared.state,
                                   prepared.batch)
  start = time.perf_counter()
  step = prepared.compile()
  compile_s = time.perf_counter() - start
  tokens = prepared.tokens
  state, step_seconds = measure_steps(step, state, batch, steps, warmup_steps)
  ms_per_step = 1e3 * percentile(step_seconds, 50)
  tokens_per_sec = tc.batch_size * model_config.block_size / (ms_per_step / 1e3)
  peak_given = bool(peak_gflops)
  peak_gflops = peak_gflops or measure_peak_gflops(mesh)
  flops_per_token = model.train_flops_per_token(model_config)
  reference = {}
  if with_torch:
    reference = torch_reference_timing(model_config, tc, tokens, steps, warmup_steps,
                                       tokens_per_sec)
  others = measure_eval_and_generation(state["params"], tokens, placement, tc, model_config,
                                       config.sample)
  saves = measure_checkpoints(step, state, batch, saves)
  interval_ms = tc.checkpoint_interval * ms_per_step
  return {
      "shape": f"{model_config.n_layer}x{model_config.n_embd}/{model_config.n_head}h, "
               f"block {model_config.block_size}, batch {tc.batch_size}",
      "n_params": model.n_params(model_config),
      "devices": f"{mesh.size} x {mesh.devices.flat[0].platform} (data-parallel)",
      "eval_device": f"{placement.eval_device.platform}:{placement.eval_device.id}",
      "microbatches": tc.microbatches, "compile_s": compile_s, "ms_per_step": ms_per_step,
      "ms_per_step_p10": 1e3 * percentile(step_seconds, 10),
      "ms_per_step_p90": 1e3 * percentile(step_seconds, 90),
      "tokens_per_sec": tokens_per_sec, "flops_per_token": flops_per_token,
      "peak_gflops": peak_gflops, "peak_given": peak_given,
      "mfu_pct": 100 * flops_per_token * tokens_per_sec / (peak_gflops * 1e9),
      **reference, **others,
      "checkpoint_save_blocked_ms": saves["save_ms"],
      "checkpoint_save_blocked_ms_max": saves["save_ms_max"],
      "checkpoint_save_total_cost_ms": saves["save_cost_ms"],
      "checkpoint_interval": tc.checkpoint_interval,
      "checkpoint_blocked_overhead_pct": 100 * saves["save_ms"] / interval_ms,
      "checkpoint_total_overhead_pct": 100 * saves["save_cost_ms"] / interval_ms,
      "bench_peak_rss_mb": memory.peak_resident_mb(),
  }
