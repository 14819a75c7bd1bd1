"""Several processes, one model: `python -m randygpt.launch --processes=N` (launch.sh), and
launch.sh itself: processes by nature."""

import json
import os
from pathlib import Path
import signal
import subprocess
import time

import psutil
import pytest

from randygpt import checkpoint

from conftest import (REPO, as_args, read_metrics, run_training, tiny, wait_for,
                      write_corpus)

RUN = tiny(eval_interval=10, log_interval=5, checkpoint_interval=10)
FLAGS = ["--data=c.txt", *as_args(RUN)]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  write_corpus(tmp_path / "c.txt")


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_in_one(run_cli, corpus, tmp_path, capsys):
  run_training("one", **RUN, data="c.txt", iters=20)  # In this process, on its 2 devices.
  two = run_cli("--processes=2", *FLAGS, "--iters=20", "--workdir=two", module="randygpt.launch")
  assert two.returncode == 0, two.stderr
  assert two.stdout.count("iter   20 |") == 1  # One log stream: process 0's.
  for got, want in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"),
                       strict=True):
    for key in ("train_loss", "val_loss", "eval_train_loss"):
      assert got.get(key) == pytest.approx(want.get(key), abs=1e-4), (key, got["iter"])
  capsys.readouterr()
  assert run_training("two", iters=25, resume=True)["status"] == "completed"
  assert "Resumed from two/checkpoints/latest/20" in capsys.readouterr().out


@pytest.fixture
def start_launcher(start_cli):
  def start(*args):
    return start_cli("--processes=2", *FLAGS, *args, module="randygpt.launch")
  return start


@pytest.mark.slow
def test_ctrl_c_stops_every_process_at_the_same_step(start_launcher, corpus, tmp_path):
  proc = start_launcher("--iters=100000", "--workdir=w")
  wait_for(proc, "\niter ")
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, stderr
  assert "Interrupted at iteration" in stdout
  summary = json.loads((tmp_path / "w" / "summary.json").read_text())
  assert summary["status"] == "interrupted"


def wait_for_a_checkpoint(workdir, patience_s: float = 120) -> None:
  """Until the save at iteration 10 is complete (on busy cores it may end after 15)."""
  deadline = time.monotonic() + patience_s
  while checkpoint.Checkpoints(workdir).newest() is None and time.monotonic() < deadline:
    time.sleep(0.05)


@pytest.mark.slow
def test_when_one_process_dies_the_launcher_stops_the_others(start_launcher, corpus, tmp_path):
  """The survivor waits in a collective for the dead one. JAX's heartbeat would end it after
  --distributed_timeout (600 s here); the launcher kills it at once, so the run ends long
  before the 120 s the test waits (docs/measurements.md, "Multi-process faults": seconds)."""
  proc = start_launcher("--iters=100000", "--workdir=w", "--distributed_timeout=600")
  wait_for(proc, "\niter   15 ")
  wait_for_a_checkpoint(tmp_path / "w")
  children = psutil.Process(proc.pid).children()
  assert len(children) == 2
  children[1].kill()
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGKILL and "Traceback" not in stderr, stderr
  newest = checkpoint.Checkpoints(tmp_path / "w").newest()
  assert stderr.splitlines()[-1] == (
      "Error: Process 1 of 2 was killed (SIGKILL); the others were stopped (a save needs "
      f"every process, so none was made). The last complete checkpoint is "
      f"{newest.relative_to(tmp_path)}: resume with --resume.")
  assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
  assert json.loads((tmp_path / "w" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_started_by_hand_a_dead_process_ends_the_other_with_one_line(start_cli, corpus,
                                                                     tmp_path, victim):
  """Without the launcher (by hand, SLURM), the survivor's watch (its helper process) sees
  the dead one's connection close and kills it at once; JAX's heartbeat (600 s here) would
  end it only long after the 120 s the test waits."""
  from randygpt.launch import free_port
  address = f"127.0.0.1:{free_port()}"
  procs = [start_cli(*FLAGS, "--iters=100000", "--workdir=w", "--distributed_timeout=600",
                     f"--coordinator_address={address}", "--num_processes=2",
                     f"--process_id={rank}") for rank in range(2)]
  wait_for(procs[0], "\niter   15 ")
  wait_for_a_checkpoint(tmp_path / "w")
  procs[victim].kill()
  survivor = procs[1 - victim]
  try:
    stdout, stderr = survivor.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail(f"still running 120 s after the kill; stderr: {survivor.communicate()[1]}")
  procs[victim].communicate(timeout=60)
  newest = checkpoint.Checkpoints(tmp_path / "w").newest()
  assert survivor.returncode == -signal.SIGKILL and "Traceback" not in stderr, stderr
  assert stderr.splitlines()[-1] == (
      f"Error: Process {victim} of 2 ended without finishing the run; this process stops too "
      "(a save needs every process, so none was made). The last complete checkpoint is "
      f"{newest.relative_to(tmp_path)}: resume with --resume."), stderr
  if victim == 1:  # Process 0 writes the run's files.
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["status"] == "failed"


def test_launch_sh_passes_a_flagfile_flag_on_unchanged(tmp_path):
  result = subprocess.run([str(REPO / "launch.sh"), "--flagfile=missing.cfg"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "No such file or directory: 'missing.cfg'" in result.stderr, result.stderr


def test_launch_sh_report_runs_the_report(tmp_path):
  result = subprocess.run([str(REPO / "launch.sh"), "report", "missing"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and result.stderr == "Error: missing does not exist.\n"


@pytest.mark.parametrize("command, args, error", [
    ("sample", ["--workdir=missing"], "Error: missing has no latest checkpoint.\n"),
    ("bench", ["--text_sizes=x"], "Error: --text_sizes=x: give sizes in bytes, e.g. 1e6,1e8.\n")])
def test_launch_sh_runs_sample_and_bench(tmp_path, command, args, error):
  result = subprocess.run([str(REPO / "launch.sh"), command, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and result.stderr == error


@pytest.mark.parametrize("how", [{"RANDYGPT_STACK": "mps"}, "--stack=mps", "--stack=metal"])
def test_launch_sh_keeps_apple_s_stacks_to_a_mac(tmp_path, how):
  """Elsewhere their plugins do not install (their lines' markers leave out even JAX): one
  line, and no environment made. The stack's own environment on a Mac is docs/accelerators.md's."""
  env = {**os.environ, **(how if isinstance(how, dict) else {})}
  args = [] if isinstance(how, dict) else [how]
  result = subprocess.run([str(REPO / "launch.sh"), *args, "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
  stack = "mps" if isinstance(how, dict) else how.split("=")[1]
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr == (f"launch.sh: the {stack} stack is for macOS on Apple Silicon, and "
                           f"this is {os.uname().sysname}/{os.uname().machine}; use the "
                           "default stack (unset RANDYGPT_STACK)\n")
  assert not (REPO / f".venv-{stack}").exists()


def test_launch_sh_refuses_an_unknown_stack(tmp_path):
  result = subprocess.run([str(REPO / "launch.sh"), "--stack=rocm", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert result.stderr == ("launch.sh: unknown stack 'rocm' (RANDYGPT_STACK or --stack=): "
                           "cpu, cuda, mps or metal\n")


def _stub(path: Path, script: str) -> None:
  path.write_text("#!/bin/sh\n" + script)
  path.chmod(0o755)


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="JAX's CUDA build is Linux's")
@pytest.mark.parametrize("stack", [None, "cpu"])
def test_launch_sh_takes_the_cuda_stack_where_nvidia_smi_lists_a_gpu(tmp_path, stack):
  """A stub nvidia-smi lists a GPU; a stub Python passes the version check and fails to make
  the environment, so that nothing is installed: where launch.sh got to says which stack it
  took (RANDYGPT_STACK=cpu keeps the CPU build's .venv, which exists here)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir / "nvidia-smi", "echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
  _stub(bin_dir / "python-stub", '[ "$1" = -c ] && exit 0\necho "stub: $*" >&2\nexit 3\n')
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "PYTHON": str(bin_dir / "python-stub")}
  env.pop("RANDYGPT_STACK", None)
  if stack:
    env["RANDYGPT_STACK"] = stack
  result = subprocess.run([str(REPO / "launch.sh"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
  if stack == "cpu":  # .venv as it is: main's help.
    assert result.stderr == "" and "--iters" in result.stdout
    return
  assert result.returncode == 3
  assert result.stderr.splitlines()[:2] == [
      "launch.sh: nvidia-smi lists a GPU: using JAX's CUDA build (.venv-cuda; "
      "RANDYGPT_STACK=cpu for the CPU build)",
      f"launch.sh: creating {REPO}/.venv-cuda with {bin_dir}/python-stub"]
  assert not (REPO / ".venv-cuda").exists()
