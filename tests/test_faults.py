"""The fault battery: what a real machine does to a run. Kills on a seeded schedule, hangups
with and without nohup, a second Ctrl-C, a filesystem that fills during training and during
a save, and the faults of start-up. Each ends without a traceback, with one `Error:` or
`Interrupted` line, summary.json saying what happened, and at most the iterations since the
last complete checkpoint lost (none for a signal the run can catch).

Runs are processes where the process is under test (signals, exits, a filesystem mounted
for the run), and in this process otherwise.
"""

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import termios
import time

import jax
import pytest

from randygpt import checkpoint, data, metrics
from randygpt.runtime import cli, rundir

from conftest import (as_args, raises_user_error, run_training, tiny, wait_for,
                      write_corpus)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
AS_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]  # Root, less its
# capabilities that write anywhere.

# Checkpoints every 2 iterations, evaluations (best checkpoints) every 3: best is often the
# newer one, as in the fault audit (--eval_interval not a multiple of --checkpoint_interval).
RUN = tiny(log_interval=1, eval_interval=3, checkpoint_interval=2, max_new_tokens=5)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  write_corpus(tmp_path / "c.txt")
  return "c.txt"


def summary(workdir) -> dict:
  return json.loads((workdir / "summary.json").read_text())


def iters(workdir) -> list[int]:
  return [r["iter"] for r in metrics.read_records(workdir / "metrics.jsonl")]


def launch(cli_env, cwd, *args, **popen):
  """`python -m randygpt.main args...` started in `cwd` (text pipes unless `popen` says)."""
  popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} | popen
  return subprocess.Popen([sys.executable, "-m", "randygpt.main", *args], cwd=cwd,
                          env=cli_env, **popen)


def start(cli_env, cwd, *args, **popen):
  """The RUN in `cwd`/w, training on until stopped."""
  return launch(cli_env, cwd, "--data=c.txt", *as_args(RUN), "--iters=100000", *args,
                "--workdir=w", **popen)


def assert_resumes_from_newest(workdir, capsys, extra: int = 2) -> int:
  """A --resume from the newest complete checkpoint, `extra` iterations on; its iteration."""
  newest = checkpoint.Checkpoints(workdir).newest()
  capsys.readouterr()
  result = run_training(workdir.name, iters=int(newest.name) + extra, resume=True)
  assert result["status"] == "completed", result
  assert f"Resumed from {newest.relative_to(workdir.parent)} at" in capsys.readouterr().out
  assert iters(workdir) == sorted(set(iters(workdir))), "the record has iterations twice"
  return int(newest.name)


# Resuming picks the newest state.

def test_resume_takes_the_newer_best_checkpoint(corpus, tmp_path, capsys):
  """The fault audit's case: killed at iteration 4 with latest at 2 and best at 3. --resume
  continues from best, discards nothing, and drops the record's lines past 3."""
  run_training("w", **(RUN | {"data": corpus, "iters": 2}))  # latest/2
  run_training("x", **(RUN | {"data": corpus, "iters": 3}))  # best/3, its records 1-3
  shutil.rmtree(tmp_path / "w" / "checkpoints" / "best")
  shutil.copytree(tmp_path / "x" / "checkpoints" / "best", tmp_path / "w" / "checkpoints" / "best")
  with open(tmp_path / "w" / "metrics.jsonl", "w") as f:
    f.write((tmp_path / "x" / "metrics.jsonl").read_text() + '{"iter": 4, "train_loss": 9}\n')
  capsys.readouterr()
  assert run_training("w", iters=5, resume=True)["status"] == "completed"
  out = capsys.readouterr().out
  assert "The best checkpoint (w/checkpoints/best/3) is newer than the latest" in out
  assert "Resumed from w/checkpoints/best/3 at iteration 3" in out
  records = metrics.read_records(tmp_path / "w" / "metrics.jsonl")
  assert [r["iter"] for r in records] == [1, 2, 3, 4, 5] and records[3]["train_loss"] != 9


def test_a_summary_left_running_is_marked_killed_at_the_next_start(tmp_path, capsys):
  (tmp_path / "summary.json").write_text('{"status": "running", "iters": 4}')
  with rundir.claim(tmp_path):
    assert summary(tmp_path) == {"status": "killed", "iters": 4}
  assert "ended without a word" in capsys.readouterr().out
  with rundir.claim(tmp_path):  # An ended run's summary is left as it is.
    assert summary(tmp_path)["status"] == "killed"


# Kills.

def saves_in_flight(workdir) -> set:
  """The temporary directories of unfinished saves in `workdir`."""
  return {p.relative_to(workdir) for p in workdir.glob("checkpoints/*/*.orbax-checkpoint-tmp*")}


@pytest.mark.slow
def test_sigkill_on_a_seeded_schedule_always_resumes_from_the_newest_state(
    cli_env, corpus, tmp_path, capsys):
  """20 runs each killed at a random moment (seeded), or, every other one, once a save's
  temporary directory appears: some while a save is in flight, as the stopped process
  shows; each next start marks the summary killed and resumes from the newest complete checkpoint, losing only
  what came after it. About 15 s a run on two busy cores, most of it start-up."""
  schedule = random.Random(29)
  kills, in_saves, workdir, tmp_seen = 20, 0, tmp_path / "w", set()
  for kill in range(kills):
    newest = checkpoint.Checkpoints(workdir).newest()
    proc = start(cli_env, tmp_path, *(["--resume"] if kill else []))
    seen = wait_for(proc, f"\niter {int(newest.name) + 1 if newest else 1:4d} ")
    assert not kill or "ended without a word" in seen, seen  # The last kill's summary.
    assert not newest or f"Resumed from {newest.relative_to(tmp_path)} at" in seen, seen
    if kill % 2:  # Every other kill aims at a save: once its temporary directory appears.
      wait_for(proc, "Saving checkpoint at iteration")
      deadline = time.monotonic() + 5
      while not saves_in_flight(workdir) - tmp_seen and time.monotonic() < deadline:
        time.sleep(0.002)
    else:
      time.sleep(schedule.uniform(0.2, 1.5))
    # Stopped, the process shows what the kill lands in: a save's temporary directory that
    # no earlier run left (Orbax removes those at this run's first save, not before).
    proc.send_signal(signal.SIGSTOP)
    tmp = saves_in_flight(workdir)
    in_saves += bool(tmp - tmp_seen)
    tmp_seen |= tmp
    proc.kill()
    proc.communicate(timeout=60)
    assert summary(workdir)["status"] == "running"
  print(f"{kills} kills, {in_saves} inside a save")  # -s shows it.
  assert in_saves >= 2, "too few kills landed in saves to test them: change the schedule"
  stopped = assert_resumes_from_newest(workdir, capsys)
  assert iters(workdir) == list(range(1, stopped + 3))


# Hangups and second signals.

def read_until(master: int, text: str) -> str:
  seen = ""
  while text not in seen:
    seen += os.read(master, 4096).decode(errors="replace")
  return seen


def take_the_terminal():
  """In the child: the pty as its controlling terminal, and SIGHUP as outside nohup (a suite
  run under nohup would pass its SIGHUP ignored on)."""
  signal.signal(signal.SIGHUP, signal.SIG_DFL)
  fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.slow
def test_closing_the_terminal_saves_and_ends_by_sighup(cli_env, corpus, tmp_path, capsys):
  """The run is a terminal's session leader (its controlling terminal a pty) when the
  terminal closes: the kernel sends SIGHUP, and writing to the terminal fails (EIO)."""
  master, slave = os.openpty()
  proc = start(cli_env, tmp_path, stdin=slave, stdout=slave, stderr=slave, text=False,
               start_new_session=True, preexec_fn=take_the_terminal)
  os.close(slave)
  read_until(master, "\niter    4")
  os.close(master)
  proc.wait(timeout=120)
  assert proc.returncode == -signal.SIGHUP  # A shell sees 129.
  ended = summary(tmp_path / "w")
  assert ended["status"] == "interrupted"
  assert checkpoint.Checkpoints(tmp_path / "w").path("latest").name == str(ended["iters"])
  assert_resumes_from_newest(tmp_path / "w", capsys)


@pytest.mark.slow
def test_sighup_under_nohup_changes_nothing(cli_env, corpus, tmp_path):
  proc = start(cli_env, tmp_path,  # As nohup starts it: SIGHUP ignored.
               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
  wait_for(proc, "\niter    3")
  proc.send_signal(signal.SIGHUP)
  wait_for(proc, "\niter    8")  # Still training.
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == -signal.SIGTERM and "Traceback" not in stderr, stderr
  assert "SIGHUP" not in stdout and "SIGTERM received" in stdout
  assert summary(tmp_path / "w")["status"] == "interrupted"


@pytest.mark.slow
def test_a_second_ctrl_c_after_a_few_seconds_leaves_at_once(cli_env, corpus, tmp_path):
  """The first waits for an evaluation that takes minutes (as a hung device would); the
  second, later than PATIENCE_S, leaves at once naming the last complete checkpoint."""
  proc = start(cli_env, tmp_path, "--checkpoint_interval=1", "--eval_iters=200000")
  wait_for(proc, "Evaluating at iteration 3...")
  proc.send_signal(signal.SIGINT)
  wait_for(proc, "SIGINT received: stopping after this step.")
  time.sleep(cli.PATIENCE_S + 0.5)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
  latest = checkpoint.Checkpoints(tmp_path / "w").newest()
  assert stdout.strip().splitlines()[-1] == (
      f"Interrupted again: leaving now. The last complete checkpoint is "
      f"{latest.relative_to(tmp_path)}: resume with --resume.")
  assert summary(tmp_path / "w")["status"] == "interrupted"


# A filesystem that fills up: a tmpfs of a few MiB mounted for the test (root: CI).

@pytest.fixture
def small_filesystem(tmp_path):
  """A 2 MiB tmpfs at tmp_path/disk, or a skip saying why there is none."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                           capture_output=True, text=True) if shutil.which("mount") else None
  if mounted is None or mounted.returncode:
    pytest.skip("cannot mount a tmpfs here (needs root, as in CI): "
                + (mounted.stderr.strip() if mounted else "no mount command")
                + "; test_hardening's RLIMIT_FSIZE case still runs")
  print(f"full-filesystem path: a tmpfs mounted at {disk}")
  try:
    yield disk
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int) -> None:
  """Fills the filesystem of `disk` up to `leave` bytes free."""
  stat = os.statvfs(disk)
  free = stat.f_bavail * stat.f_frsize
  with open(disk / "filler", "ab") as f:
    with contextlib.suppress(OSError):
      f.write(b"\0" * max(free - leave, 0))


@pytest.mark.slow
@pytest.mark.parametrize("flags, leave, message", [
    (["--checkpoint_interval=1000", "--eval_interval=1000"], 0,
     r"Could not write w/metrics.jsonl \(No space left on device\)\. Its last checkpoint "
     r"is kept: w/checkpoints/latest/4\. Free some disk space, then resume with --resume\."),
    (["--eval_interval=1000"], 64 << 10,
     r"Could not save the latest checkpoint at iteration \d+ \(No space left on device\), "
     r"on a second try too\. The previous checkpoint w/checkpoints/latest/\d+ is kept; free "
     r"some disk space, then resume with --resume\."),
], ids=["during-training", "during-a-save"])
def test_a_filesystem_that_fills_up(cli_env, small_filesystem, capsys, monkeypatch, flags,
                                    leave, message):
  """Filled to `leave` bytes free between two steps, as another program would: with none,
  metrics.jsonl's next page fails first; with a little, the next checkpoint. After space is
  freed the run resumes from its newest checkpoint."""
  monkeypatch.chdir(small_filesystem)
  write_corpus(small_filesystem / "c.txt")
  run_training("w", **(RUN | {"data": "c.txt", "iters": 4, "eval_interval": 1000}))
  proc = start(cli_env, small_filesystem, "--resume", *flags)
  wait_for(proc, "\niter    6")
  proc.send_signal(signal.SIGSTOP)
  fill(small_filesystem, leave)
  proc.send_signal(signal.SIGCONT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 1 and "Traceback" not in stderr, (stdout, stderr)
  assert re.fullmatch(f"Error: {message}\n", stderr), stderr
  assert summary(small_filesystem / "w")["status"] == "failed"
  (small_filesystem / "filler").unlink()  # Space again.
  assert assert_resumes_from_newest(small_filesystem / "w", capsys) >= 4


# Start-up faults.

def test_resume_with_a_batch_below_the_recorded_device_count(run_cli, corpus, tmp_path):
  run_training("w", **RUN, data=corpus, iters=2, num_cpu_devices=2)
  result = run_cli("--resume", "--iters=4", "--batch_size=1", "--workdir=w")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr == (
      "Error: --workdir=w trained on 2 CPU devices (its flags.cfg), more than --batch_size=1: "
      "pass a --batch_size of at least 2, or --num_cpu_devices=1 or fewer.\n")


@pytest.mark.skipif(not IS_ROOT or not shutil.which("setpriv"),
                    reason="read-only directories need root's setpriv here")
@pytest.mark.parametrize("what", ["cache", "download"])
def test_read_only_cache_or_download_directory(run_cli, corpus, tmp_path, what):
  read_only = tmp_path / "ro"
  read_only.mkdir(mode=0o555)
  args = ["--data=c.txt", *as_args(RUN), "--iters=2", "--workdir=w"]
  env = {}
  if what == "cache":
    env = {"RANDYGPT_CACHE": str(read_only)}
    expected = f"Error: Could not write the token cache {read_only}/tokens/"
  else:
    args[0] = "--data=ro/tinyshakespeare.txt"  # A known dataset: downloaded there.
    expected = ("Error: Cannot write the download ro/tinyshakespeare.txt (Permission denied). "
                "Put the file there yourself, or pass --data=PATH to a text file.")
  result = run_cli(*args, env=env, wrapper=AS_USER)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
  assert "(Permission denied)" in result.stderr


def test_data_that_changes_while_its_cache_is_built(corpus, tmp_path, monkeypatch):
  scan = data.cache._scan

  def scan_then_append(files, *args):
    found = scan(files, *args)
    with open(files[0], "a", encoding="utf-8") as f:
      f.write("ZEBRA")  # Another program writes to it between the two passes.
    return found
  monkeypatch.setattr(data.cache, "_scan", scan_then_append)
  with raises_user_error(f"--data={corpus} changed while its token cache "
                         "was built; run again once it no longer changes."):
    data.load_corpus(corpus, tmp_path / "cache")
  assert not list((tmp_path / "cache").iterdir())  # Nothing half old, half new.


def test_an_accelerator_out_of_memory_while_placing_the_initial_state(corpus, tmp_path):
  from test_fallback import Hook, run_on_stand_in
  error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                     "allocate 1.00GiB.")
  with raises_user_error("Could not place the initial state on CPU (cpu:0) (RESOURCE_EXHAUSTED: "
                         "Out of memory while trying to allocate 1.00GiB.). Choose a smaller "
                         "model, or train on the CPU: --train_platform=cpu."):
    run_on_stand_in("w", Hook("initial-state", 1, error), train_on_accelerator=True,
                    **RUN, data=corpus, iters=2)
  assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["run.lock"]
