"""Several processes, one model: `python -m randygpt.launch --processes=N` (launch.sh)."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, make_corpus

FLAGS = ["--data=c.txt", "--n_embd=32", "--n_head=4", "--n_layer=2", "--block_size=16",
         "--batch_size=8", "--eval_iters=2", "--eval_interval=10", "--log_interval=5",
         "--max_new_tokens=10", "--checkpoint_interval=10"]


@pytest.fixture
def corpus(tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")


def records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_in_one(run_cli, corpus, tmp_path):
  one = run_cli(*FLAGS, "--iters=20", "--workdir=one")
  assert one.returncode == 0, one.stderr
  two = run_cli("--processes=2", *FLAGS, "--iters=20", "--workdir=two", module="randygpt.launch")
  assert two.returncode == 0, two.stderr
  assert two.stdout.count("iter   20 |") == 1  # One log stream: process 0's.
  for got, want in zip(records(tmp_path / "two"), records(tmp_path / "one"), strict=True):
    for key in ("train_loss", "val_loss", "eval_train_loss"):
      assert got.get(key) == pytest.approx(want.get(key), abs=1e-4), (key, got["iter"])
  resumed = run_cli("--iters=25", "--resume", "--workdir=two")
  assert resumed.returncode == 0, resumed.stderr
  assert "Resumed from two/checkpoints/latest/20" in resumed.stdout


def test_unreachable_coordinator_gives_up_with_a_message(run_cli, corpus):
  start = time.monotonic()
  result = run_cli(*FLAGS, "--iters=5", "--coordinator_address=127.0.0.1:9",
                   "--num_processes=2", "--process_id=1", "--distributed_timeout=5")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "Process 1 could not join the run at 127.0.0.1:9 within 5s" in result.stderr
  assert time.monotonic() - start < 60


def start_launcher(tmp_path, cli_env, *args):
  return subprocess.Popen(
      [sys.executable, "-m", "randygpt.launch", "--processes=2", *FLAGS, *args],
      cwd=tmp_path, env={**cli_env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def wait_for_training(proc):
  for line in proc.stdout:
    if line.startswith("iter"):
      return
  raise AssertionError(proc.stderr.read())


@pytest.mark.slow
def test_ctrl_c_stops_every_process_at_the_same_step(cli_env, corpus, tmp_path):
  proc = start_launcher(tmp_path, cli_env, "--iters=100000", "--workdir=w")
  wait_for_training(proc)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, stderr
  assert "Interrupted at iteration" in stdout
  summary = json.loads((tmp_path / "w" / "summary.json").read_text())
  assert summary["status"] == "interrupted"


@pytest.mark.slow
def test_when_one_process_dies_the_launcher_stops_the_others(cli_env, corpus, tmp_path):
  proc = start_launcher(tmp_path, cli_env, "--iters=100000", "--workdir=w")
  wait_for_training(proc)
  children = psutil.Process(proc.pid).children()
  assert len(children) == 2
  children[1].kill()
  proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_launch_sh_passes_a_flagfile_flag_on_unchanged(tmp_path):
  result = subprocess.run([str(REPO / "launch.sh"), "--flagfile=missing.cfg"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "No such file or directory: 'missing.cfg'" in result.stderr, result.stderr


def test_launch_sh_report_runs_the_report(tmp_path):
  result = subprocess.run([str(REPO / "launch.sh"), "report", "missing"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and result.stderr == "Error: missing does not exist.\n"
