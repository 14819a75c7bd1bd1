"""The cores this process may use: its CPU affinity (taskset, a SLURM cpuset) where the
system has one, bounded by a cgroup CPU quota (a container's --cpus), with hyperthreads of
one physical core counted once. Placement chooses training devices from it, the PyTorch peers
take one thread per usable CPU from it, and the token cache hashes on as many threads.

`usable_cores` is the rule, a pure function of what the system says; `usable()` reads the
system (Linux: sched_getaffinity, /sys/fs/cgroup, /sys/devices/system/cpu; macOS has neither
affinity nor cgroups: every CPU, its physical cores from sysctl).
"""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


@dataclasses.dataclass(frozen=True)
class Cores:
  """What this process may use: `cpus` hardware threads on `cores` physical cores; `why`
  says what bounded them, for the header ("" when nothing did)."""
  cpus: int
  cores: int
  why: str = ""


def usable_cores(online: int, affinity: frozenset[int] | None = None,
                 quota: float | None = None,
                 core_of: dict[int, str] | None = None) -> Cores:
  """The rule. `online`: the machine's CPUs; `affinity`: the CPUs this process may run on
  (None: no such thing here); `quota`: a cgroup's CPU time in CPUs (None: unlimited);
  `core_of`: each CPU's physical core (CPUs missing from it are cores of their own).

  Hyperthreads: the CPUs of one core count as one core and as all their CPUs. A quota of q
  CPUs allows ceil(q) of either (1.5 CPUs of time run two threads at once, each part of the
  time), at least 1."""
  allowed = sorted(affinity) if affinity else list(range(max(online, 1)))
  cpus = len(allowed)
  cores = len({(core_of or {}).get(cpu, f"cpu{cpu}") for cpu in allowed})
  reasons = []
  if affinity and cpus < online:
    reasons.append(f"affinity: {cpus} of {online} CPUs")
  if quota is not None and math.ceil(quota) < cpus:
    limit = max(1, math.ceil(quota))
    cpus, cores = limit, min(cores, limit)
    reasons.append(f"cgroup quota: {quota:g} CPUs")
  if cores < cpus:
    reasons.append(f"{cores} cores of {cpus} hardware threads")
  return Cores(cpus, cores, ", ".join(reasons))


def parse_cpu_list(text: str) -> frozenset[int]:
  """A kernel CPU list, e.g. "0-3,8,10-11"."""
  cpus = set()
  for part in text.strip().split(","):
    if part:
      first, _, last = part.partition("-")
      cpus.update(range(int(first), int(last or first) + 1))
  return frozenset(cpus)


def parse_cpu_max(text: str) -> float | None:
  """cgroup v2's cpu.max ("max 100000" or "150000 100000") in CPUs; None when unlimited."""
  fields = text.split()
  if len(fields) < 2 or fields[0] == "max":
    return None
  return int(fields[0]) / int(fields[1])


def parse_cfs(quota_text: str, period_text: str) -> float | None:
  """cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us in CPUs; None when unlimited (-1)."""
  quota, period = int(quota_text), int(period_text)
  return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
  try:
    return path.read_text()
  except (OSError, UnicodeDecodeError):
    return None


def _ancestors(mount: Path, relative: str) -> list[Path]:
  """The cgroup directory under `mount` and those above it (a parent's limit holds too)."""
  parts = [p for p in relative.split("/") if p]
  return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_quota(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
  """The smallest CPU quota of this process's cgroups (v2, else v1), in CPUs; None when
  there is none. `membership`: /proc/self/cgroup's text."""
  if membership is None:
    membership = _read(Path("/proc/self/cgroup")) or ""
  quotas = []
  for line in membership.splitlines():
    _, controllers, relative = line.split(":", 2)
    if controllers == "":  # v2: one unified hierarchy.
      for directory in _ancestors(root, relative):
        if (text := _read(directory / "cpu.max")) is not None:
          quotas.append(parse_cpu_max(text))
    elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy.
      mount = next((root / name for name in (controllers, "cpu", "cpu,cpuacct")
                    if (root / name).is_dir()), root / "cpu")
      for directory in _ancestors(mount, relative):
        quota, period = (_read(directory / f"cpu.cfs_{n}_us") for n in ("quota", "period"))
        if quota is not None and period is not None:
          quotas.append(parse_cfs(quota, period))
  return min((q for q in quotas if q is not None), default=None)


def core_siblings(cpus, topology: Path = CPU_TOPOLOGY) -> dict[int, str]:
  """Each CPU's physical core, named by the list of its hardware threads (Linux sysfs)."""
  found = {}
  for cpu in cpus:
    for name in ("core_cpus_list", "thread_siblings_list"):
      if (text := _read(topology / f"cpu{cpu}" / "topology" / name)) is not None:
        found[cpu] = text.strip()
        break
  return found


def _macos_physical_cores() -> int | None:
  try:
    done = subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True,
                          timeout=5)
    return int(done.stdout) if done.returncode == 0 else None
  except (OSError, ValueError, subprocess.SubprocessError):
    return None


def usable() -> Cores:
  """The cores this process may use, as this system says."""
  online = os.cpu_count() or 1
  if not hasattr(os, "sched_getaffinity"):  # macOS, Windows: every CPU.
    physical = _macos_physical_cores() if sys.platform == "darwin" else None
    core_of = ({cpu: f"core{cpu % physical}" for cpu in range(online)}
               if physical and physical < online else None)
    return usable_cores(online, core_of=core_of)
  affinity = frozenset(os.sched_getaffinity(0))
  return usable_cores(online, affinity, cgroup_quota(), core_siblings(affinity))


def first_cores(count: int, affinity, core_of: dict[int, str]) -> list[int]:
  """`count` of the allowed CPUs, one per physical core first, in CPU order: what a process
  pinned to `count` cores runs on (the first hardware thread of each of the first cores)."""
  firsts, seconds, seen = [], [], set()
  for cpu in sorted(affinity):
    core = core_of.get(cpu, f"cpu{cpu}")
    (seconds if core in seen else firsts).append(cpu)
    seen.add(core)
  return (firsts + seconds)[:count]
