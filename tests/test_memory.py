from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randygpt.runtime import memory

LINUX = Path("/proc/self/smaps_rollup").exists()


def file_backed_resident_mb():
  fields = {}
  for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
    name, value = line.split()[:2]
    fields[name.rstrip(":")] = int(value) / 2**10
  return fields["Rss"] - fields["Anonymous"]


def test_resident_and_peak_memory():
  if not LINUX:
    pytest.skip("resident memory is read from Linux's /proc")
  assert 0 < memory.resident_mb() <= memory.peak_resident_mb()


def test_unmodified_library_mappings_cover_the_loaded_libraries():
  if not LINUX:
    pytest.skip("mappings are read from Linux's /proc")
  mappings = memory.unmodified_library_mappings()
  library_bytes = sum(length for _, length in mappings)
  assert library_bytes > 100 * 2**20  # jaxlib alone maps more.
  assert all(address > 0 and length > 0 for address, length in mappings)


def test_release_hands_back_library_pages_and_compiled_code_still_runs():
  if not LINUX:
    pytest.skip("library pages are handed back on Linux")
  def f(x):
    return jnp.tanh(x @ x.T).sum(axis=0)

  x = jnp.arange(64.0).reshape(8, 8) / 64
  expected = np.asarray(jax.jit(f)(x))
  before = file_backed_resident_mb()
  memory.release_free_memory()
  assert file_backed_resident_mb() < before / 2
  np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), expected)
  with jax.disable_jit():
    np.testing.assert_allclose(np.asarray(f(x)), expected, rtol=1e-6)
