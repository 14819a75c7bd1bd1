"""Jitted functions whose lowering is kept between runs (`jax.export`).

The persistent compilation cache keeps machine code, but JAX finds it by the lowered
module, so every run traces and lowers each function first. That is slow at start-up: each
`jax.random` draw's threefry is lowered afresh (~50 ms a draw: 0.3 s for the init and for
the window sampler), and tracing and lowering the train step took 0.9-1.1 s of a 3.3 s
start-up at the default shape here (docs/measurements.md, "Start-up"). So once `configure`
gave a cache directory, `compile_kept` saves a function's lowering (StableHLO) in a
single-process run on CPU devices, and later runs load it. The key: the function's traced
jaxpr and constants (safe whatever changed), or, for the train step, whose tracing is
itself slow, randygpt's source and the caller's config (an edit to the code makes a new
key); with JAX's and optax's versions, the JAX and XLA environment and the arguments'
shapes, dtypes and devices.
"""

import hashlib
import os
import pickle
from pathlib import Path

import jax
import jaxlib.version
import numpy as np
import optax
from jax import export

from randygpt.data import trust

PACKAGE = Path(__file__).resolve().parent.parent
_CACHE = {"dir": None}  # Set once per process by `configure`.


def configure(cache: Path | None) -> None:
  _CACHE["dir"] = cache


def compile_kept(jitted, *args, donate_argnums=(), config_key: str | None = None):
  """`jitted` (a `jax.jit` function returning arrays) compiled for `args` (placed on the
  devices it runs on): a function of arguments like them. Its lowering is loaded from the
  cache when a run saved it under the same key (above; `config_key` for the
  source-and-config key), and saved there otherwise. Without a cache, not on CPU devices or
  in a multi-process run, `jitted.lower(*args).compile()`."""
  leaves, in_tree = jax.tree.flatten(args)
  platforms = {d.platform for x in leaves if hasattr(x, "sharding")
               for d in x.sharding.device_set}
  if any(not hasattr(x, "sharding") for x in leaves):  # Host arrays go to the default device.
    platforms.add(_default_platform())
  if _CACHE["dir"] is None or platforms - {"cpu"} or jax.process_count() > 1:
    return jitted.lower(*args).compile()
  impls = [jax.random.key_impl(x) if _is_key(x) else None for x in leaves]
  bits = _bits(leaves, impls)  # Raw bits: jax 0.5 cannot serialize key types.
  key = _source_key(config_key) if config_key is not None else _trace_key(jitted, args)
  path = _CACHE["dir"] / f"{_digest(key, bits)}.lowered"
  starts = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in args])
  donated = tuple(i for a in donate_argnums for i in range(starts[a], starts[a + 1]))
  exported, out_tree = _load(path) or _export_and_save(jitted, in_tree, impls, donated, path,
                                                      bits)
  compiled = jax.jit(exported.call, donate_argnums=donated).lower(*bits).compile()

  def call(*args):
    return jax.tree.unflatten(out_tree, compiled(*_bits(jax.tree.leaves(args), impls)))
  return call


def _default_platform() -> str:
  """The platform of the device that JAX puts host arrays on now."""
  device = jax.config.jax_default_device
  if device is None:
    return jax.default_backend()
  return device if isinstance(device, str) else device.platform


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _bits(leaves, impls) -> list:
  return [jax.random.key_data(x) if impl else x for x, impl in zip(leaves, impls)]


def _load(path: Path):
  """The entry at `path`; None when there is none, or when another user could have written
  it (unpickling it would run their code: data/trust.py)."""
  try:
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
      if not trust.trusted_entry(os.fstat(f.fileno())):
        return None
      data = f.read()
  except OSError:  # Not saved yet.
    return None
  try:
    serialized, out_tree = pickle.loads(data)
    return export.deserialize(bytearray(serialized)), out_tree
  except Exception:  # pylint: disable=broad-except  # Not an entry: flatbuffers' many errors.
    return None


def _export_and_save(jitted, in_tree, impls, donated, path: Path, bits):
  out_trees = []

  def flat(*bits):  # Flat lists of arrays: optax's state types do not serialize.
    leaves = [jax.random.wrap_key_data(x, impl=impl) if impl else x
              for x, impl in zip(bits, impls)]
    out = jitted(*jax.tree.unflatten(in_tree, leaves))
    out_trees.append(jax.tree.structure(out))
    return jax.tree.leaves(out)
  exported = export.export(jax.jit(flat, donate_argnums=donated), platforms=["cpu"])(*bits)
  partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
  try:
    entry = pickle.dumps((exported.serialize(), out_trees[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)  # Never written through a link someone left there.
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600),
              "wb") as f:
      f.write(entry)
    partial.replace(path)  # Whole or absent, whoever reads it.
  except (ImportError, OSError):  # No flatbuffers, or a cache we cannot write: not kept.
    partial.unlink(missing_ok=True)
  return exported, out_trees[0]


def _source_key(config_key: str) -> bytes:
  digest = hashlib.sha256(config_key.encode())
  for source in sorted(PACKAGE.rglob("*.py")):
    digest.update(source.read_bytes())
  return digest.digest()


def _trace_key(jitted, args) -> bytes:
  jaxpr = jitted.trace(*args).jaxpr
  digest = hashlib.sha256(str(jaxpr).encode())
  for const in jaxpr.consts:
    const = jax.random.key_data(const) if _is_key(const) else const
    digest.update(repr((np.shape(const), str(np.asarray(const).dtype))).encode())
    digest.update(np.asarray(const).tobytes())
  return digest.digest()


def _digest(key: bytes, bits) -> str:
  environment = sorted((k, v) for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_")))
  specs = [_spec(x) for x in bits]
  versions = jax.__version__, jaxlib.version.__version__, optax.__version__
  return hashlib.sha256(key + repr((versions, environment, specs)).encode()).hexdigest()[:32]


def _spec(x) -> tuple:
  sharding = getattr(x, "sharding", None)  # NumPy arguments have none.
  devices = sorted((d.process_index, d.id) for d in sharding.device_set) if sharding else None
  return np.shape(x), str(x.dtype), str(sharding), devices
