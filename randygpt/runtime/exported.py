"""The train step kept as StableHLO (`jax.export`) between runs.

A second run of the same shape loads the persistent compilation cache's machine code, but
JAX must first trace and lower the step to look it up: 0.9-1.1 s of a 3.3 s start-up at the
default shape here (docs/measurements.md, "Start-up"). So a run on CPU devices also saves
the lowered step, keyed by randygpt's source, JAX's version, the environment's JAX and XLA
settings, the caller's config and the arguments' shapes, devices and shardings; a later run
with the same key loads it and skips the tracing. Any edit to randygpt's code makes a new
key.
"""

import hashlib
import os
from pathlib import Path

import jax
import jaxlib.version
from jax import export

PACKAGE = Path(__file__).resolve().parent.parent


def compile_step(step_fn, config_key: str, cache: Path, state, batch, rng: jax.Array):
  """`step_fn(state, batch, rng) -> (state, metrics dict)` (jitted, the state donated)
  compiled for these arguments; on CPU devices loaded from `cache` when a run with the same
  code, `config_key` and arguments saved it there, and saved there otherwise."""
  leaves, treedef = jax.tree.flatten(state)
  args = (batch, jax.random.key_data(rng))  # Raw bits: jax 0.5 cannot serialize key types.
  platforms = {d.platform for x in leaves for d in x.sharding.device_set}
  path = cache / f"{_key(config_key, leaves, args)}.train_step"
  exported = (_load(path) or _export_and_save(step_fn, treedef, jax.random.key_impl(rng),
                                              path, leaves, args)
              if platforms == {"cpu"} else None)
  if exported is None:  # Not on the CPU.
    return step_fn.lower(state, batch, rng).compile()
  compiled = jax.jit(exported.call, donate_argnums=0).lower(leaves, *args).compile()

  def step(state, batch, rng):
    new_leaves, metrics = compiled(jax.tree.leaves(state), batch, jax.random.key_data(rng))
    return jax.tree.unflatten(treedef, new_leaves), metrics
  return step


def _load(path: Path) -> export.Exported | None:
  try:
    data = path.read_bytes()
  except OSError:  # Not saved yet.
    return None
  try:
    return export.deserialize(bytearray(data))
  except Exception:  # pylint: disable=broad-except  # Not an entry: flatbuffers' many errors.
    return None


def _export_and_save(step_fn, treedef, rng_impl, path: Path, leaves,
                     args) -> export.Exported:
  def flat_step(leaves, batch, rng_bits):  # Lists and dicts: optax's types do not serialize.
    state, metrics = step_fn(jax.tree.unflatten(treedef, leaves), batch,
                             jax.random.wrap_key_data(rng_bits, impl=rng_impl))
    return jax.tree.leaves(state), metrics
  exported = export.export(jax.jit(flat_step, donate_argnums=0), platforms=["cpu"])(
      leaves, *args)
  partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
  try:
    serialized = exported.serialize()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(serialized)
    partial.replace(path)  # Whole or absent, whoever reads it.
  except (ImportError, OSError):  # No flatbuffers, or a cache we cannot write: not kept.
    partial.unlink(missing_ok=True)
  return exported


def _key(config_key: str, leaves, args) -> str:
  digest = hashlib.sha256()
  for source in sorted(PACKAGE.rglob("*.py")):
    digest.update(source.read_bytes())
  environment = sorted((k, v) for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_")))
  specs = [(x.shape, str(x.dtype), str(x.sharding),
            sorted((d.process_index, d.id) for d in x.sharding.device_set))
           for x in jax.tree.leaves((leaves, args))]
  digest.update(repr((jax.__version__, jaxlib.version.__version__, environment, config_key,
                      specs)).encode())
  return digest.hexdigest()[:32]
