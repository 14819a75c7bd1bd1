"""The optimizer: AdamW with global-norm clipping and a warmup-then-cosine schedule.

Weight decay applies to the 2-D weight matrices inside the blocks and the lm_head,
not to the token and position embeddings: decaying an embedding row pulls rare
characters towards zero for no gain in generalisation.
"""

import jax
import optax

from randygpt.config import TrainConfig

NO_DECAY = frozenset({"wte", "wpe"})


def decay_horizon(config: TrainConfig) -> int:
  """The iteration the cosine decay ends at: --lr_decay_iters, or for 0 the --iters of the
  run's first start (the run then records it, so that a resume keeps it)."""
  return config.lr_decay_iters or config.iters


def lr_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine down to `min_lr` at the horizon, then flat."""
  decay_iters = decay_horizon(config)
  warmup = min(config.warmup_iters, decay_iters)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(decay_iters, warmup + 1), end_value=config.min_lr)


def schedule_count(opt_state) -> jax.Array:
  """The schedule's step count in the optimizer state: the updates done so far."""
  return optax.tree_utils.tree_get(
      opt_state, "count", filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState")


def decay_mask(params) -> dict:
  """True for every leaf that weight decay applies to."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key not in NO_DECAY, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
      optax.adamw(lr_schedule(config), b1=config.beta1, b2=config.beta2,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )
