"""The train state and the train step: pure functions over pytrees, tested directly.

The state is a plain dict `{"params", "opt"}`, with `"ema"` beside them under --ema_decay:
the moving average of the weights that evaluation, the best checkpoint and sampling use
(`eval_params`). The optax state carries the learning-rate schedule's step count. Data
windows and dropout masks are pure functions of (seed, iteration), so a resumed run continues
exactly as if it had never stopped.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from randygpt import model, optim, sharding
from randygpt.config import ModelConfig, TrainConfig

# Independent random streams, each derived from the seed with `jax.random.fold_in`
# (generate.SAMPLE_STREAM is 4).
INIT_STREAM, DATA_STREAM, DROPOUT_STREAM, EVAL_STREAM = range(4)


def init_train_state(key: jax.Array, model_config: ModelConfig,
                     optimizer: optax.GradientTransformation, ema: bool = False) -> dict:
  """Fresh weights and optimizer state; with `ema`, the weights' average starts at them."""
  params = model.init_params(key, model_config)
  state = {"params": params, "opt": optimizer.init(params)}
  return with_average(state) if ema else state


def with_average(state: dict) -> dict:
  """`state` with the weights' average (--ema_decay) started at its weights, in buffers of
  its own (the step donates both)."""
  return state | {"ema": jax.tree.map(jnp.copy, state["params"])}


def state_initializer(model_config: ModelConfig, tc: TrainConfig):
  """key -> a fresh train state of the run's model and optimizer (unjitted; also what a
  checkpoint's state is restored into the shapes of)."""
  return functools.partial(init_train_state, model_config=model_config,
                           optimizer=optim.make_optimizer(tc), ema=tc.ema_decay > 0)


def eval_params(state: dict) -> dict:
  """The weights that are evaluated, kept as best and sampled: the average when kept."""
  return state.get("ema", state["params"])


def update_ema(ema: dict, params: dict, decay: float, updates: jax.Array) -> dict:
  """The weights' exponential moving average after update number `updates` (1, 2...): its
  decay warmed up as min(decay, (1 + t) / (10 + t)), as TensorFlow's ExponentialMovingAverage
  does, so that the early average is not mostly the initial weights."""
  decay_t = jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))
  return optax.incremental_update(params, ema, 1.0 - decay_t)


def train_step(state: dict, batch, rng: jax.Array, *, model_config: ModelConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int = 1, mesh: jax.sharding.Mesh | None = None,
               ema_decay: float = 0.0) -> tuple[dict, dict]:
  """One optimizer step on the batch loss (with dropout), its gradient summed over
  `microbatches` equal slices of the batch (of each device's rows, on `mesh`) run one after
  another, and the weights' average moved (`update_ema`) when the state keeps one; returns
  the new state and the step's metrics: loss, gradient norm and the learning rate it
  used."""
  loss_and_grads = functools.partial(batch_loss_and_grads, model_config=model_config,
                                     microbatches=microbatches)
  if mesh is None:
    loss, grads = loss_and_grads(state["params"], batch, rng, 0)
  else:
    loss, grads = sharding.on_each_device(loss_and_grads, mesh)(state["params"], batch, rng)
  updates, opt = optimizer.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  count = optim.schedule_count(state["opt"])
  metrics = {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads),
             "lr": schedule(count)}
  new_state = {"params": params, "opt": opt}
  if "ema" in state:
    new_state["ema"] = update_ema(state["ema"], params, ema_decay, count + 1)
  return new_state, metrics


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


def jit_train_step(model_config: ModelConfig, tc: TrainConfig, mesh: jax.sharding.Mesh,
                   microbatches: int = 1):
  """The jitted train step over `mesh`: batches split along `data` (`sharding.batch_sharded`),
  each device's gradient computed on its rows and averaged once, the state replicated, the
  old state donated."""
  replicated = sharding.replicated(mesh)
  # Slices that span devices (a count not dividing each device's rows, e.g. a --microbatches
  # from a resume on fewer devices) are left to XLA's partitioning of the whole step.
  on_each_device = tc.batch_size // mesh.size % microbatches == 0
  return jax.jit(functools.partial(
      train_step, model_config=model_config, optimizer=optim.make_optimizer(tc, mesh),
      schedule=optim.lr_schedule(tc), microbatches=microbatches,
      mesh=mesh if on_each_device else None, ema_decay=tc.ema_decay),
                 out_shardings=(replicated, replicated), donate_argnums=0)


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))
