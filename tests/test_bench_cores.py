"""--cores: the pinned processes, the brackets around the automatic placement, the table.
(The timings themselves run in tools/device-check-cores.sh and docs/measurements.md.)"""

import os
import subprocess
import sys

import pytest

from randygpt.bench import cores as bench_cores
from randygpt.bench.__main__ import child_argv


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_a_pinned_process_runs_on_its_cpus_with_as_many_peer_threads():
  first = min(os.sched_getaffinity(0))
  probe = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
  done = subprocess.run(bench_cores.pinned([first], [sys.executable, "-c", probe]),
                        env=bench_cores.thread_env([first], dict(os.environ)),
                        capture_output=True, text=True, check=True)
  assert done.stdout.split() == [f"[{first}]", "1"]


@pytest.mark.parametrize("auto, batch, expected", [
    (2, 32, (1, 4)), (1, 32, (None, 2)), (8, 32, (4, 16)), (3, 12, (1, 6)),
    (2, 5, (1, 5)),  # 5 does not divide by 4: the next count that does.
    (256, 512, (128, None)),  # Past XLA's CPU device limit.
])
def test_the_brackets_halve_and_double_the_devices(auto, batch, expected):
  got = bench_cores.brackets(auto, batch)
  assert (got["randygpt_half"], got["randygpt_double"]) == expected


def test_the_pinned_processes_get_the_parent_s_flags_less_its_own():
  argv = ["--flagfile=experiments/shakespeare.cfg", "--shapes=tiny,default", "--cores=1,2",
          "--steps=20", "--json", "--nocore_brackets", "--num_cpu_devices=2",
          "--shape_repeats=2", "--nanogpt_iters=30", "--learning_rate=1e-3"]
  assert child_argv(argv) == ["--flagfile=experiments/shakespeare.cfg", "--steps=20",
                              "--learning_rate=1e-3"]


def test_a_row_gives_the_medians_and_both_ratios():
  def results(*ms, devices=None):
    return [{"ms": m, **({"devices": devices, "microbatches": 1} if devices else {})}
            for m in ms]
  row = bench_cores.core_row("default", 4, [0, 1, 2, 3], {
      "randygpt": results(100, 120, 110, devices=4), "randygpt_half": results(90, 95, 99,
                                                                             devices=2),
      "torch_reference": results(150, 140, 160), "nanogpt": results(200, 210, 220)})
  assert row["randygpt"] == 110 and row["randygpt_half"] == 95 and row["randygpt_double"] is None
  assert row["auto_vs_faster_peer"] == pytest.approx(150 / 110)
  assert row["auto_vs_best_bracket"] == pytest.approx(95 / 110)
  table = bench_cores.cores_table([row]).splitlines()
  assert table[2] == ("| default | 4 | 110.0 (4 x 1) | 95.0 (2 x 1) | - | 150.0 | 210.0 | "
                      "1.36x | 0.86x |")
