"""The optimizer: AdamW with global-norm clipping and a warmup-then-cosine schedule.

Weight decay applies to the 2-D weight matrices inside the blocks and the lm_head,
not to the token and position embeddings: decaying an embedding row pulls rare
characters towards zero for no gain in generalisation.
"""

import jax
import optax

from randygpt.config import TrainConfig

NO_DECAY = frozenset({"wte", "wpe"})


def lr_schedule(config: TrainConfig, decay_iters: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine down to `min_lr` at `decay_iters`, then flat."""
  warmup = min(config.warmup_iters, decay_iters)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(decay_iters, warmup + 1), end_value=config.min_lr)


def decay_mask(params) -> dict:
  """True for every leaf that weight decay applies to."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key not in NO_DECAY, params)


def make_optimizer(config: TrainConfig, decay_iters: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
      optax.adamw(lr_schedule(config, decay_iters), b1=config.beta1, b2=config.beta2,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )
