"""Wall-clock timing of jitted work: the clock stops when the device has finished."""

import time


def timed(fn, *args):
  """`fn(*args)` and its seconds, its outputs computed (JAX dispatches asynchronously)."""
  start = time.perf_counter()
  out = fn(*args)
  jax_block(out)
  return out, time.perf_counter() - start


def jax_block(tree):
  import jax
  jax.block_until_ready(tree)


def percentile(values, q):
  import numpy as np
  return float(np.percentile(values, q))
