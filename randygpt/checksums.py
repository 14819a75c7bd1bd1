"""Checksums of a pytree's arrays, computed where the arrays are (on their devices), for
checkpoints: written into a checkpoint's metadata at save time, checked after a restore.

Each array's bits, as unsigned words, are mixed with their flat index (murmur3's
finaliser, a bijection) and summed modulo 2^32, twice with two seeds: 64 bits an array.
A changed element changes exactly one term of each sum, so one damaged element (a flipped
bit, a zeroed page of one array) is always caught; more are missed with odds of about
2^-64. Integer sums are exact in any order: the same for any device count or sharding.
"""

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _mix(h):
  """murmur3's 32-bit finaliser: a bijection that spreads each input bit over the word."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x):
  """`x`'s bits as uint32, one word an element (narrower dtypes widened)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_sums(x):
  words = _words(x).reshape(-1)
  index = jnp.arange(words.size, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(_mix(words ^ _mix(index + jnp.uint32(seed))), dtype=jnp.uint32)
                    for seed in _SEEDS])


@jax.jit
def _tree_sums(tree):
  return jax.tree.map(_array_sums, tree)


def tree_checksums(tree) -> dict[str, str]:
  """{key path: 16 hex digits} for each array of `tree` (every process of a run calls it
  together: the sums of sharded arrays are computed by all of them)."""
  sums = jax.tree_util.tree_flatten_with_path(_tree_sums(tree))[0]
  return {jax.tree_util.keystr(path): np.asarray(s.addressable_data(0)).astype(">u4")
          .tobytes().hex() for path, s in sums}


def mismatched(tree, saved: dict[str, str]) -> list[str]:
  """The key paths of `tree`'s arrays whose checksums differ from `saved`'s (an array
  missing from `saved` differs)."""
  return [key for key, value in tree_checksums(tree).items() if saved.get(key) != value]
