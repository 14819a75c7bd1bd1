"""Data parallelism: the device count changes the speed, not the result."""

import contextlib
import io

import jax
import numpy as np
import pytest

from randygpt import sharding
from randygpt.runtime import devices

from conftest import (as_args, raises_user_error, read_metrics, restored_state, run_training,
                      tiny, write_corpus)

RUN = tiny(eval_interval=10, log_interval=5, dropout=0.1)


def test_a_resume_finds_the_device_count_in_flags_cfg(tmp_path):
  assert devices.saved_device_count(str(tmp_path)) == 0  # No flags.cfg.
  (tmp_path / "flags.cfg").write_text("--batch_size=8\n--num_cpu_devices=2\n")
  assert devices.saved_device_count(str(tmp_path)) == 2


def test_the_batch_is_split_over_the_mesh():
  mesh = sharding.data_mesh(jax.devices("cpu"))
  assert sharding.batch_sharded(mesh).spec == jax.sharding.PartitionSpec("data")
  assert sharding.replicated(mesh).spec == jax.sharding.PartitionSpec()


def assert_same_run(workdir, reference):
  for got, want in zip(read_metrics(workdir), read_metrics(reference), strict=True):
    for key in ("train_loss", "val_loss", "eval_train_loss", "lr"):
      assert got.get(key) == pytest.approx(want.get(key), abs=1e-4), (workdir, key, got["iter"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               restored_state(workdir)["params"], restored_state(reference)["params"])


@pytest.fixture(scope="module")
def runs_on_1_and_2_devices(tmp_path_factory):
  """The same 20 iterations on 1 and on 2 CPU devices (this process has 2)."""
  root = tmp_path_factory.mktemp("devices")
  corpus = write_corpus(root / "c.txt")
  for n in (1, 2):
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
      summary = run_training(root / f"d{n}", **RUN, data=corpus, iters=20, num_cpu_devices=n)
    assert summary["status"] == "completed"
    (root / f"d{n}.out").write_text(stdout.getvalue())
  return root


def test_same_result_on_1_and_2_devices(runs_on_1_and_2_devices):
  for n in (1, 2):
    stdout = (runs_on_1_and_2_devices / f"d{n}.out").read_text()
    assert f"devices: {n} x cpu (data-parallel; --num_cpu_devices)" in stdout
  assert_same_run(runs_on_1_and_2_devices / "d2", runs_on_1_and_2_devices / "d1")


@pytest.mark.slow
def test_same_result_on_4_devices(run_cli, runs_on_1_and_2_devices, tmp_path):
  """Four devices need a process of their own: the count is fixed when JAX starts."""
  result = run_cli(f"--data={runs_on_1_and_2_devices / 'c.txt'}", *as_args(RUN), "--iters=20",
                   "--num_cpu_devices=4", "--workdir=d4")
  assert result.returncode == 0, result.stderr
  assert "devices: 4 x cpu (data-parallel; --num_cpu_devices)" in result.stdout
  assert_same_run(tmp_path / "d4", runs_on_1_and_2_devices / "d1")


def test_uneven_batch_is_refused_naming_both_numbers(tmp_path):
  with raises_user_error("--batch_size=5 does not divide evenly across 2 devices"):
    run_training(tmp_path / "w", **tiny(data=write_corpus(tmp_path / "c.txt"), batch_size=5,
                                        num_cpu_devices=2, iters=2))


def test_unreachable_coordinator_gives_up_with_a_message():
  with raises_user_error("Process 1 could not join the run at 127.0.0.1:9 within 1s"):
    devices.join_cluster("127.0.0.1:9", num_processes=2, process_id=1, timeout_s=1)
