"""The train state and the train step: pure functions over pytrees, tested directly.

The state is a plain dict `{"params", "opt"}`; the optax state carries the learning-rate
schedule's step count. Data windows and dropout masks are pure functions of (seed,
iteration), so a resumed run continues exactly as if it had never stopped.
"""

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from randygpt import checkpoint, model, optim
from randygpt.config import ModelConfig, TrainConfig
from randygpt.runtime import devices, exported, footprint

# Independent random streams, each derived from the seed with `jax.random.fold_in`
# (generate.SAMPLE_STREAM is 4).
INIT_STREAM, DATA_STREAM, DROPOUT_STREAM, EVAL_STREAM = range(4)
# A train step on the CPU runs its batch in slices (microbatches), each device's share of a
# slice small enough for its activations to stay in the CPU's caches, but not so small that
# its matmuls (the weight gradients are D x tokens x D) stop filling the cores. Both bounds
# measured over devices x microbatches at seven shapes (docs/measurements.md, "The
# automatic choices across shapes").
CPU_SLICE_ACTIVATION_BYTES = 20 << 20
CPU_MIN_SLICE_TOKENS = 256


def init_train_state(key: jax.Array, model_config: ModelConfig,
                     optimizer: optax.GradientTransformation) -> dict:
  params = model.init_params(key, model_config)
  return {"params": params, "opt": optimizer.init(params)}


def train_step(state: dict, batch, rng: jax.Array, *, model_config: ModelConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int = 1, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[dict, dict]:
  """One optimizer step on the batch loss (with dropout), its gradient summed over
  `microbatches` equal slices of the batch (of each device's rows, on `mesh`) run one after
  another; returns the new state and the step's metrics: loss, gradient norm and the
  learning rate it used."""
  loss_and_grads = functools.partial(batch_loss_and_grads, model_config=model_config,
                                     microbatches=microbatches)
  if mesh is None:
    loss, grads = loss_and_grads(state["params"], batch, rng, 0)
  else:
    loss, grads = devices.on_each_device(loss_and_grads, mesh)(state["params"], batch, rng)
  updates, opt = optimizer.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads),
             "lr": schedule(optim.schedule_count(state["opt"]))}
  return {"params": params, "opt": opt}, metrics


def batch_loss_and_grads(params: dict, batch, rng: jax.Array, first_row, *,
                         model_config: ModelConfig, microbatches: int):
  """The mean loss of `batch` (rows `first_row`... of the whole batch) and its gradient, in
  `microbatches` slices: slice i takes rows i, i+k, i+2k..."""
  def slices(x_BxT):
    b, t = x_BxT.shape
    return x_BxT.reshape(b // microbatches, microbatches, t).swapaxes(0, 1)

  def add_slice(total, inputs):
    i, microbatch = inputs[0], inputs[1:]
    rows_B = first_row + i + microbatches * jnp.arange(microbatch[0].shape[0])
    loss_and_grads = jax.value_and_grad(model.loss_fn)(
        params, microbatch, model_config, train=True, rng=rng, rows_B=rows_B)
    return optax.tree_utils.tree_add(total, loss_and_grads), None

  zeros = (jnp.zeros(()), optax.tree_utils.tree_zeros_like(params))
  total, _ = jax.lax.scan(add_slice, zeros, (jnp.arange(microbatches), *map(slices, batch)))
  return jax.tree.map(lambda x: x / microbatches, total)


def largest_fitting_divisor(count: int, tokens_each: int, max_tokens: int) -> int:
  """The largest divisor n of `count` (at least 1) whose n items of `tokens_each` tokens
  hold at most `max_tokens`: how many batches an estimate runs at once, or how many
  sequences a microbatch holds."""
  return max([n for n in divisors(count) if n * tokens_each <= max_tokens], default=1)


def divisors(n: int) -> list[int]:
  """The divisors of n, ascending (sqrt(n) steps: --batch_size may be 10**9)."""
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted({*small, *(n // d for d in small)})


def train_microbatches(tc: TrainConfig, model_config: ModelConfig, platform: str,
                       devices: int = 1) -> int:
  """--microbatches, or for 0: on the CPU the fewest slices whose share on each of `devices`
  holds at most CPU_SLICE_ACTIVATION_BYTES of activations, but no fewer than
  CPU_MIN_SLICE_TOKENS tokens (the count dividing each device's rows, so that slices stay on
  their devices); elsewhere 1."""
  if tc.microbatches or platform != "cpu":
    return tc.microbatches or 1
  rows, t = tc.batch_size // devices, model_config.block_size
  counts = [n for n in divisors(rows) if rows // n * t >= CPU_MIN_SLICE_TOKENS] or [1]
  fitting = [n for n in counts if footprint.activations(model_config, rows // n * t)
             <= CPU_SLICE_ACTIVATION_BYTES]
  return min(fitting) if fitting else max(counts)


def choose_microbatches(tc: TrainConfig, model_config: ModelConfig, platform: str, *,
                        devices: int, explicit: bool, resumed: bool) -> tuple[int, str]:
  """The step's microbatch count and the header's reason: --microbatches when `explicit`,
  else the checkpoint's on a resume (unless a new --batch_size no longer divides by it),
  else automatic. The count goes into the run's config: flags.cfg and the checkpoints keep
  it, so a resume or a repeat from flags.cfg takes the same step."""
  if tc.microbatches and explicit:
    return tc.microbatches, "--microbatches"
  if tc.microbatches and resumed and tc.batch_size % tc.microbatches == 0:
    return tc.microbatches, "kept from the checkpoint"
  auto = train_microbatches(dataclasses.replace(tc, microbatches=0), model_config, platform,
                            devices)
  if platform != "cpu":
    return auto, f"automatic on {platform}"
  tokens = tc.batch_size // (devices * auto) * model_config.block_size
  size = footprint.human_bytes(footprint.activations(model_config, tokens))
  return auto, f"automatic: slices of {tokens} tokens on each device, {size} of activations"


def jit_train_step(model_config: ModelConfig, tc: TrainConfig, mesh: jax.sharding.Mesh,
                   microbatches: int = 1):
  """The jitted train step over `mesh`: batches split along `data` (`devices.batch_sharded`),
  each device's gradient computed on its rows and averaged once, the state replicated, the
  old state donated."""
  replicated = devices.replicated(mesh)
  # Slices that span devices (a count not dividing each device's rows, e.g. a --microbatches
  # from a resume on fewer devices) are left to XLA's partitioning of the whole step.
  on_each_device = tc.batch_size // mesh.size % microbatches == 0
  return jax.jit(functools.partial(
      train_step, model_config=model_config, optimizer=optim.make_optimizer(tc, mesh),
      schedule=optim.lr_schedule(tc), microbatches=microbatches,
      mesh=mesh if on_each_device else None),
                 out_shardings=(replicated, replicated), donate_argnums=0)


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def initial_state(key: jax.Array, model_config: ModelConfig, tc: TrainConfig,
                  source: Path | None, sharding: jax.sharding.Sharding) -> dict:
  """A fresh train state, or the one saved at `source`, placed with `sharding`."""
  init = functools.partial(init_train_state, model_config=model_config,
                           optimizer=optim.make_optimizer(tc))
  if source is None:  # One jitted init: eager ops would each compile and stay cached.
    if sharding.is_fully_addressable:  # Placed for its kept lowering (one process only).
      key = jax.device_put(key, sharding)
    return exported.compile_kept(jax.jit(init, out_shardings=sharding), key)(key)
  restored = checkpoint.restore_state(
      source, checkpoint.abstract_like(jax.eval_shape(init, key), sharding))
  # jaxlib 0.5 (the Metal stack) can hand back arrays that share host memory with NumPy;
  # donating those to the train step corrupts the heap, so the step gets its own copies.
  return jax.tree.map(jnp.copy, restored)
