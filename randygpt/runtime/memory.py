"""The process's memory: how much it holds, and keeping glibc and Linux from holding more.

glibc's malloc gives each thread that allocates its own arena and keeps what is freed
there: XLA's worker threads then hold ~100 MB that the process never uses again. Its mmap
threshold moves as large blocks are freed; fixed at 1 MB, every step mapped its temporary
buffers afresh and faulted their pages in (7-50% of a step), so it is fixed at glibc's
maximum, 32 MB: a step's buffers are reused from the heap. Compiling leaves hundreds of MB
free but resident, handed back with `malloc_trim`. Linux, for its part, keeps every page of
library code the process has run mapped: after compiling, ~150 MB of jaxlib (mostly XLA's
compiler) that training never runs again. All of it is undone here where the system
allows (docs/measurements.md, "Memory").
"""

import ctypes
import resource

# mallopt parameters, from glibc's malloc.h; madvise advice, from Linux's mman.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MADV_DONTNEED = 4
# Blocks this large are mapped, and unmapped when freed; free memory this large at the top
# of the heap is given back. Measured in docs/measurements.md, "Memory" (malloc's settings).
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def _glibc():
  libc = ctypes.CDLL(None)
  return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def configure_malloc() -> None:
  """One malloc arena for all threads, and fixed thresholds for mapping and trimming; call
  before JAX starts its threads."""
  if libc := _glibc():
    libc.mallopt(_M_ARENA_MAX, 1)
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def unmodified_library_mappings() -> list[tuple[int, int]]:
  """(address, length) of each read-only mapping of a shared library (code and constants) none
  of whose pages this process has modified, from Linux's /proc/self/smaps; [] elsewhere."""
  try:
    with open("/proc/self/smaps") as smaps:
      lines = smaps.read().splitlines()
  except OSError:
    return []
  mappings, mapping = [], None
  for line in lines:
    fields = line.split()
    if not fields[0].endswith(":"):  # A mapping's first line: range, permissions, ..., path.
      start, end = (int(address, 16) for address in fields[0].split("-"))
      path = " ".join(fields[5:])
      library = path.startswith("/") and ".so" in path and "w" not in fields[1]
      mapping = (start, end - start) if library else None
    elif fields[0] == "Anonymous:" and mapping and fields[1] == "0":
      mappings.append(mapping)
  return mappings


def release_free_memory() -> None:
  """Hands back what is resident but unused after a compilation: malloc's free memory, and
  the library pages mapped so far; those needed again map back in from the page cache."""
  libc = ctypes.CDLL(None)
  if hasattr(libc, "malloc_trim"):  # glibc.
    libc.malloc_trim(0)
  for address, length in unmodified_library_mappings():  # Unmodified: dropping loses nothing.
    libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_DONTNEED)


def _status_mb(field: str) -> float | None:
  """A memory field of /proc/self/status (Linux), in MB; None where there is none."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 2**10  # kB.
  except OSError:
    pass
  return None


def resident_mb() -> float | None:
  """Resident memory now, where the system says (Linux), else None."""
  return _status_mb("VmRSS")


def resident_bytes() -> int:
  """Resident memory now; 0 where the system does not say."""
  return int((resident_mb() or 0) * 2**20)


def peak_resident_mb() -> float:
  """The largest resident memory so far. Linux's VmHWM, not ru_maxrss: a child process
  inherits its parent's ru_maxrss."""
  peak = _status_mb("VmHWM")
  if peak is None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Bytes on macOS.
  return peak


def device_peak_mb(device) -> float | None:
  """The most memory `device`'s allocator has held (an accelerator's `peak_bytes_in_use`);
  None where the backend keeps no such count (the CPU)."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # Plugins raise assorted types, or none is implemented.
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20
