"""The cores this process may use: affinity, cgroup quotas and hyperthreads, given as
arguments (and the readers on files laid out as the kernel lays them out)."""

import os

import pytest

from randygpt.runtime import cores
from randygpt.runtime.cores import Cores, usable_cores

SMT = {0: "0,8", 8: "0,8", 1: "1,9", 9: "1,9", 2: "2,10", 10: "2,10", 3: "3,11", 11: "3,11"}


@pytest.mark.parametrize("kwargs, expected", [
    ({"online": 2}, Cores(2, 2)),
    ({"online": 2, "affinity": frozenset({0, 1})}, Cores(2, 2)),
    ({"online": 2, "affinity": frozenset({0})}, Cores(1, 1, "affinity: 1 of 2 CPUs")),
    ({"online": 64, "affinity": frozenset(range(16, 20))},
     Cores(4, 4, "affinity: 4 of 64 CPUs")),
    ({"online": 64, "quota": 4.0}, Cores(4, 4, "cgroup quota: 4 CPUs")),
    ({"online": 64, "quota": 1.5}, Cores(2, 2, "cgroup quota: 1.5 CPUs")),
    ({"online": 64, "quota": 0.25}, Cores(1, 1, "cgroup quota: 0.25 CPUs")),
    ({"online": 2, "quota": 8.0}, Cores(2, 2)),  # A quota above the CPUs bounds nothing.
    ({"online": 16, "affinity": frozenset(range(16)),
      "core_of": {c: f"{c % 8},{c % 8 + 8}" for c in range(16)}},
     Cores(16, 8, "8 cores of 16 hardware threads")),
    ({"online": 16, "affinity": frozenset({0, 8, 1}), "core_of": SMT},
     Cores(3, 2, "affinity: 3 of 16 CPUs, 2 cores of 3 hardware threads")),
    ({"online": 16, "affinity": frozenset(range(16)), "quota": 4.0,
      "core_of": {c: f"{c % 8},{c % 8 + 8}" for c in range(16)}},
     Cores(4, 4, "cgroup quota: 4 CPUs")),
])
def test_the_rule(kwargs, expected):
  assert usable_cores(**kwargs) == expected


@pytest.mark.parametrize("text, expected", [
    ("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-1,8,10-11\n", {0, 1, 8, 10, 11}), ("", set())])
def test_cpu_lists(text, expected):
  assert cores.parse_cpu_list(text) == expected


def test_quota_files():
  assert cores.parse_cpu_max("max 100000\n") is None
  assert cores.parse_cpu_max("150000 100000\n") == 1.5
  assert cores.parse_cfs("-1", "100000") is None
  assert cores.parse_cfs("400000\n", "100000\n") == 4.0


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_a_cgroup_v2_quota_is_the_smallest_of_the_process_and_its_parents(tmp_path):
  write(tmp_path / "cpu.max", "max 100000\n")
  write(tmp_path / "jobs" / "cpu.max", "300000 100000\n")
  write(tmp_path / "jobs" / "job1" / "cpu.max", "max 100000\n")
  assert cores.cgroup_quota(tmp_path, "0::/jobs/job1\n") == 3.0
  assert cores.cgroup_quota(tmp_path, "0::/\n") is None
  assert cores.cgroup_quota(tmp_path, "0::/elsewhere\n") is None  # No such directory.


def test_a_cgroup_v1_quota(tmp_path):
  write(tmp_path / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us", "200000\n")
  write(tmp_path / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us", "100000\n")
  write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
  write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
  membership = "9:memory:/docker\n2:cpu,cpuacct:/docker\n0::/\n"
  assert cores.cgroup_quota(tmp_path, membership) == 2.0


def test_siblings_from_sysfs(tmp_path):
  write(tmp_path / "cpu0" / "topology" / "thread_siblings_list", "0,2\n")
  write(tmp_path / "cpu2" / "topology" / "core_cpus_list", "0,2\n")
  assert cores.core_siblings([0, 1, 2], tmp_path) == {0: "0,2", 2: "0,2"}


def test_pinning_takes_one_thread_of_each_core_first():
  assert cores.first_cores(3, range(16), {c: str(c % 8) for c in range(16)}) == [0, 1, 2]
  assert cores.first_cores(3, [0, 1, 8, 9], SMT) == [0, 1, 8]
  assert cores.first_cores(2, [4, 5], {}) == [4, 5]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_this_process():
  got = cores.usable()
  assert 1 <= got.cores <= got.cpus <= len(os.sched_getaffinity(0))
