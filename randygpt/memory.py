"""The process's memory: how much it holds, and keeping glibc from holding more.

glibc's malloc gives each thread that allocates its own arena and keeps what is freed
there: XLA's worker threads then hold ~100 MB that the process never uses again. It also
raises its mmap threshold as large blocks are freed, so a train step's temporary buffers
end up in the heap and stay resident, and compiling leaves hundreds of MB free but
resident (measured, see WORKSPACE.md). All three are undone here where the C library is
glibc; elsewhere nothing happens.
"""

import ctypes
import resource

# mallopt parameters, from glibc's malloc.h.
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
MMAP_THRESHOLD_BYTES = 1 << 20  # Blocks this large are mapped, and unmapped when freed.


def _glibc():
  libc = ctypes.CDLL(None)
  return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def configure_malloc() -> None:
  """One malloc arena for all threads, and large blocks returned when freed; call before
  JAX starts its threads."""
  if libc := _glibc():
    libc.mallopt(_M_ARENA_MAX, 1)
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
  """Hands memory that is free but still resident (e.g. after a compilation) back."""
  if libc := _glibc():
    libc.malloc_trim(0)


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


def peak_resident_mb() -> float:
  """The largest resident memory so far. Linux's VmHWM, not ru_maxrss: a child process
  inherits its parent's ru_maxrss."""
  peak = _status_mb("VmHWM")
  if peak is None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Bytes on macOS.
  return peak
