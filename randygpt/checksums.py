"""Checksums of a pytree's arrays, computed where the arrays are (on their devices), for
checkpoints: written into a checkpoint's metadata at save time, checked after a restore.

Each array's bits, as unsigned words, are mixed with their flat index i (murmur3's
finaliser, a bijection, of the word xor a multiple of i), and two sums are kept modulo
2^32: of the mixed words, and of each times 2i+1 (odd, so invertible): 64 bits an array.
A changed element changes exactly one term of each sum, so one damaged element (a flipped
bit, a zeroed page of one array) is always caught, and moved elements are seen by their
index; other damage is missed with odds of about 2^-64. Integer sums are exact in any
order: the same for any device count or sharding. One mix an element keeps it to one pass
over memory (docs/measurements.md, "Checkpoints").
"""

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9  # 2^32 / the golden ratio: consecutive indices far apart.


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
  mixed = _mix(words ^ (index * jnp.uint32(_GOLDEN)))
  return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32),
                    jnp.sum(mixed * (2 * index + 1), dtype=jnp.uint32)])


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
