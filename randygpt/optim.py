"""The optimizer: AdamW (or Muon for the blocks' matrices) with global-norm clipping and a
warmup-then-cosine (or warmup-stable-decay) schedule.

Weight decay applies to the 2-D weight matrices inside the blocks and the lm_head,
not to the token and position embeddings: decaying an embedding row pulls rare
characters towards zero for no gain in generalisation.

`--optimizer=muon` replaces Adam's scaling of the blocks' matrices (wqkv as its three
D x D matrices, wo, w1, w2, each layer's its own) by Muon's: Nesterov momentum,
orthogonalised by Newton-Schulz iterations (optax.contrib.scale_by_muon), scaled to an RMS
of `muon_rms` so that one learning rate suits both. The embeddings and the lm_head keep
Adam. Decay and the schedule are shared: chain(clip, partition(muon | adam), decay, lr).
"""

import re

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from randygpt.config import TrainConfig
from randygpt.errors import UserError

NO_DECAY = frozenset({"wte", "wpe"})
# The blocks' matrices Muon updates, by their key in params["blocks"][...]: all of them.
MUON_LEAVES = frozenset({"wqkv", "wo", "w1", "w2"})


def decay_horizon(config: TrainConfig) -> int:
  """The iteration the cosine decay ends at: --lr_decay_iters, or for 0 the --iters of the
  run's first start (the run then records it, so that a resume keeps it)."""
  return config.lr_decay_iters or config.iters


def lr_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then down to `min_lr` at the horizon, flat after it:
  by a cosine, or (`wsd`) held until the decay's start, then linearly."""
  decay_iters = decay_horizon(config)
  warmup = min(config.warmup_iters, decay_iters)
  if config.lr_schedule == "wsd":
    return _warmup_stable_decay(config, warmup, decay_iters)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(decay_iters, warmup + 1), end_value=config.min_lr)


def decay_start(config: TrainConfig) -> int:
  """--lr_schedule=wsd: the update its decay starts at, --decay_fraction of the horizon
  before it (at least one update), never inside the warmup."""
  horizon = decay_horizon(config)
  decay = max(1, round(config.decay_fraction * horizon))
  return max(min(config.warmup_iters, horizon), horizon - decay)


def _warmup_stable_decay(config: TrainConfig, warmup: int, horizon: int) -> optax.Schedule:
  """Warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024): a linear decay, which
  lasts one update when the warmup fills the horizon."""
  start = decay_start(config)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup),
       optax.constant_schedule(config.learning_rate),
       optax.linear_schedule(config.learning_rate, config.min_lr, max(horizon - start, 1))],
      [warmup, start])


def schedule_count(opt_state) -> jax.Array:
  """The schedule's step count in the optimizer state: the updates done so far."""
  return optax.tree_utils.tree_get(
      opt_state, "count", filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState")


def decay_mask(params) -> dict:
  """True for every leaf that weight decay applies to."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key not in NO_DECAY, params)


def muon_labels(params) -> dict:
  """"muon" for every leaf Muon updates (the blocks' matrices), "adam" for the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "muon" if path[0].key == "blocks" and path[-1].key in MUON_LEAVES
      else "adam", params)


MUON_OPTAX = (0, 2, 7)


def muon_supported(version: str = optax.__version__) -> bool:
  """Whether optax's Muon orthogonalises stacked matrices as used here: 0.2.7 or newer
  (MuonDimensionNumbers came in 0.2.6, which still scaled inside scale_by_muon)."""
  release = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
  return release >= MUON_OPTAX


def _split_qkv(x, path):
  """wqkv (L, D, 3D) as (L, D, 3, D): its q, k and v matrices side by side."""
  if path[-1].key == "wqkv":
    return x.reshape(*x.shape[:-1], 3, x.shape[-1] // 3)
  return x


def _fuse_qkv(x, path):
  return x.reshape(*x.shape[:-2], -1) if path[-1].key == "wqkv" else x


def _matrices(tree):
  return jax.tree_util.tree_map_with_path(lambda path, x: _split_qkv(x, path), tree)


def _by_layer(tree, mesh: Mesh | None):
  """`tree` laid out over `mesh` by layer (the leading axis), where the layers divide evenly:
  each device orthogonalises its share of the matrices, not all of them (measurements.md,
  "Muon's update spread over the devices")."""
  if mesh is None or mesh.size == 1:
    return tree
  by_layer = NamedSharding(mesh, PartitionSpec("data"))
  whole = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, by_layer if x.shape[0] % mesh.size == 0 else whole), tree)


def scale_by_muon_blocks(rms: float, beta: float = 0.95,
                         mesh: Mesh | None = None) -> optax.GradientTransformation:
  """Muon for the stacked blocks' matrices: each (L, in, out) leaf is L matrices (wqkv 3L
  matrices of D x D), orthogonalised separately, each scaled to an RMS of `rms`
  (0.2·sqrt(max(in, out)), "Muon is Scalable for LLM Training", Liu et al. 2025). With a
  `mesh`, the layers are spread over its devices for the update."""
  def dims(tree):  # Axis 1 is the input; the output is the last axis; the rest are batches.
    return jax.tree.map(lambda x: optax.contrib.MuonDimensionNumbers(1, x.ndim - 1), tree)

  muon = optax.contrib.scale_by_muon(beta=beta, weight_dimension_numbers=dims)

  def init_fn(params):
    return muon.init(_matrices(params))

  def update_fn(updates, state, params=None):
    del params
    updates, state = muon.update(_by_layer(_matrices(updates), mesh), state)
    updates = jax.tree.map(
        lambda u: u * (rms * max(u.shape[1], u.shape[-1]) ** 0.5), updates)
    return jax.tree_util.tree_map_with_path(lambda path, u: _fuse_qkv(u, path), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: TrainConfig, mesh: Mesh | None = None) -> optax.GradientTransformation:
  """The run's optimizer; `mesh`: the training devices, over which Muon spreads its work."""
  clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity()
  if config.optimizer == "adamw":
    return optax.chain(
        clip,
        optax.adamw(lr_schedule(config), b1=config.beta1, b2=config.beta2,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )
  if not muon_supported():
    raise UserError(f"--optimizer=muon needs optax 0.2.7 or newer (installed: "
                    f"{optax.__version__}); use --optimizer=adamw, or upgrade optax.")
  # optax.adamw is this chain too: scale_by_adam, add_decayed_weights, scale_by_learning_rate.
  return optax.chain(
      clip,
      optax.partition({"muon": scale_by_muon_blocks(config.muon_rms, mesh=mesh),
                       "adam": optax.scale_by_adam(b1=config.beta1, b2=config.beta2)},
                      muon_labels),
      optax.add_decayed_weights(config.weight_decay, decay_mask),
      optax.scale_by_learning_rate(lr_schedule(config)),
  )
