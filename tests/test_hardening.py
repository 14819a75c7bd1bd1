"""Robustness of the whole program: the real CLIs against hostile inputs and faults.

Each case ends in success or in a short `Error:` (or absl flag error), a non-zero exit,
no traceback, and no existing file damaged. The README's troubleshooting table lists
what each case prints.
"""

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from randygpt import checkpoint
from randygpt import flags as randygpt_flags

from conftest import REPO, make_corpus
from test_checkpoint import restored_params

TINY = ["--n_embd=32", "--n_head=4", "--n_layer=1", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--eval_interval=2", "--max_new_tokens=20"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def assert_clean_error(result, message):
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr
  assert message in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) <= 2, result.stderr


def tree_bytes(path):
  return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_once(cli_env, tmp_path_factory):
  """A 4-iteration run on make_corpus(); tests copy it (`trained`)."""
  root = tmp_path_factory.mktemp("trained")
  (root / "c.txt").write_text(make_corpus(), encoding="utf-8")
  result = subprocess.run(
      [sys.executable, "-m", "randygpt.main", "--data=c.txt", *TINY, "--iters=4", "--workdir=w"],
      cwd=root, env={**cli_env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  return root


@pytest.fixture
def trained(trained_once, tmp_path):
  """A copy of the trained run in tmp_path: `c.txt` and the workdir `w`."""
  shutil.copytree(trained_once, tmp_path, dirs_exist_ok=True)
  return tmp_path / "w"


# Data.

@pytest.mark.parametrize("text, check", [
    ("a" * 500, lambda vocab: vocab == ["a"]),
    ("".join(map(chr, random.Random(1).choices(range(0x4E00, 0x4E00 + 4000), k=20000))),
     lambda vocab: len(vocab) > 3000),
    ("hello there,\r\ngeneral kenobi\r\n" * 40, lambda vocab: "\r" in vocab),
], ids=["one-character-vocabulary", "cjk-thousands-of-characters", "crlf"])
def test_unusual_texts_train_and_sample(run_cli, tmp_path, text, check):
  (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
  result = run_cli("--data=t.txt", *TINY, "--iters=2", "--workdir=w")
  assert result.returncode == 0, result.stderr
  assert check(json.loads((tmp_path / "w" / "vocab.json").read_text(encoding="utf-8"))["chars"])
  assert "Generating samples..." in result.stdout


def test_text_changed_before_the_resume_is_refused(run_cli, trained, tmp_path):
  with open(tmp_path / "c.txt", "a", encoding="utf-8") as f:
    f.write("Zebra!")  # Characters the first run's vocabulary lacks.
  before = tree_bytes(trained / "checkpoints")
  result = run_cli("--data=c.txt", "--iters=8", "--resume", "--workdir=w")
  assert_clean_error(result, "Checkpoint vocab_size")
  assert tree_bytes(trained / "checkpoints") == before


# Flags.

FLAGS = flags.FLAGS
NUMERIC = sorted(f.name for f in FLAGS.get_flags_for_module(randygpt_flags)
                 if isinstance(f.value, (int, float)) and not isinstance(f.value, bool))
# Values absl accepts, each run end to end below (with the tiny shape).
ACCEPTED_ZERO = {"dropout", "grad_clip", "lr_decay_iters", "max_new_tokens", "min_lr",
                 "microbatches", "num_cpu_devices", "process_id", "seed", "temperature", "top_k",
                 "warmup_iters", "weight_decay", "beta1", "beta2"}
ACCEPTED_NEGATIVE = {"seed"}
HUGE = {"n_embd": 100_000, "n_layer": 1_000_000, "batch_size": 10**9, "eval_iters": 10**9,
        "max_new_tokens": 10**10, "num_samples": 10**9}


def parses(name, value):
  with flagsaver.flagsaver():
    try:
      FLAGS.unparse_flags()
      FLAGS(["randygpt", f"--{name}={value}"])
      return True
    except flags.IllegalFlagValueError:
      return False
    finally:
      FLAGS.unparse_flags()


def test_every_numeric_flag_at_zero_negative_and_nan_is_refused_or_runs():
  assert len(NUMERIC) > 20
  assert {n for n in NUMERIC if parses(n, 0)} == ACCEPTED_ZERO
  assert {n for n in NUMERIC if parses(n, -1)} == ACCEPTED_NEGATIVE
  floats = [n for n in NUMERIC if isinstance(FLAGS[n].default, float)]
  assert not [n for n in floats for v in ("nan", "inf", "-inf") if parses(n, v)]


@pytest.mark.slow
def test_accepted_zeros_and_negative_seed_run(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  zeros = [f"--{n}=0" for n in sorted(ACCEPTED_ZERO)]
  result = run_cli("--data=c.txt", *TINY, *zeros, "--iters=2", "--workdir=z")
  assert result.returncode == 0, result.stderr
  result = run_cli("--data=c.txt", *TINY, "--seed=-5", "--iters=2", "--workdir=n")
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(HUGE))
def test_absurdly_large_shapes_are_refused_before_allocating(run_cli, tmp_path, name):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  result = run_cli("--data=c.txt", *TINY, "--n_head=1", f"--{name}={HUGE[name]}")
  assert_clean_error(result, f"Error: This run needs about ")
  assert f"--{name}" in result.stderr and "Make those smaller." in result.stderr


def test_more_cpu_devices_than_xla_can_join_are_refused(run_cli, tmp_path):
  result = run_cli("--num_cpu_devices=100000", "--batch_size=100000")
  assert_clean_error(result, "--num_cpu_devices=100000: 100000 is not an integer in the range")


def test_sampling_refuses_a_huge_request_before_allocating(run_cli, trained):
  result = run_cli("--workdir=w", "--max_new_tokens=10000000000", module="randygpt.sample")
  assert_clean_error(result, "--num_samples, --max_new_tokens. Make those smaller.")


# Files.

def test_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(run_cli, trained):
  before = tree_bytes(trained / "checkpoints")
  limit = min(len(b) for b in before.values() if len(b) > 10_000)  # Below a checkpoint file.
  # A small Python sets the limit, then becomes the run: a preexec_fn would run Python in a
  # fork of this multithreaded (JAX) process.
  with_file_size_limit = ("import os, resource, sys; n = int(sys.argv[1]); "
                          "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
                          "os.execv(sys.argv[2], sys.argv[2:])")
  result = run_cli("--iters=8", "--resume", "--workdir=w",
                   wrapper=[sys.executable, "-c", with_file_size_limit, str(limit)])
  assert_clean_error(result, "Error: Could not save the ")
  assert "File too large" in result.stderr and "is kept" in result.stderr
  for kind in checkpoint.KINDS:
    assert checkpoint.Checkpoints(trained).path(kind).name == "4"
  assert {p: b for p, b in tree_bytes(trained / "checkpoints").items()
          if "orbax-checkpoint-tmp" not in str(p)} == before
  assert json.loads((trained / "summary.json").read_text())["status"] == "failed"


def test_read_only_workdir_is_refused(run_cli, trained):
  # Root writes anywhere unless it drops the capabilities that override permissions.
  as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if IS_ROOT else []
  if as_user and not shutil.which("setpriv"):
    pytest.skip("running as root without setpriv, which writes to read-only directories")
  before = tree_bytes(trained)
  trained.chmod(0o555)
  try:
    result = run_cli("--data=c.txt", "--iters=8", "--resume", "--workdir=w", wrapper=as_user)
  finally:
    trained.chmod(0o755)
  assert_clean_error(result, "Error: Cannot write to --workdir=w (Permission denied).")
  assert tree_bytes(trained) == before


def test_workdir_with_spaces_and_non_ascii_characters(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  workdir = "runs/my run ünïcødé ✓"
  result = run_cli("--data=c.txt", *TINY, "--iters=2", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  result = run_cli(f"--workdir={workdir}", "--prompt=ANNA", module="randygpt.sample")
  assert result.returncode == 0, result.stderr
  assert f"checkpoint: {workdir}/checkpoints/best/2" in result.stdout


# Faults.

def start(cwd, env, *args, module="randygpt.main"):
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd,
                          env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for(proc, text):
  """Reads stdout until `text` appears (it may end without a newline); returns what it read."""
  seen = ""
  while text not in seen:
    char = proc.stdout.read(1)
    if not char:
      raise AssertionError(f"{text!r} never printed; stderr: {proc.stderr.read()}")
    seen += char
  return seen


@pytest.mark.slow
@pytest.mark.parametrize("phase, args", [
    ("Compiling train step...", []),
    ("Evaluating at iteration 2...", ["--eval_iters=4000"]),
    ("Saving checkpoint at iteration 2...", ["--checkpoint_interval=2"]),
    ("Generating samples...", ["--max_new_tokens=5000", "--prompt=ANNA", "--prompt=BORIS"]),
])
def test_ctrl_c_in_each_phase_stops_cleanly_and_resumes(run_cli, cli_env, tmp_path,
                                                        tmp_path_factory, phase, args):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  cold = {**cli_env, "RANDYGPT_CACHE": str(tmp_path_factory.mktemp("cold"))}
  iters = "--iters=2" if phase == "Generating samples..." else "--iters=100000"
  proc = start(tmp_path, cold, "--data=c.txt", *TINY, iters, *args, "--workdir=w")
  before = wait_for(proc, phase)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=300)
  stdout = before + stdout
  assert proc.returncode == -signal.SIGINT, stderr
  assert "Traceback" not in stderr, stderr
  latest = checkpoint.Checkpoints(tmp_path / "w").path("latest")
  assert f"Saved latest checkpoint: w/checkpoints/latest/{latest.name}" in stdout
  resumed = run_cli(f"--iters={int(latest.name) + 1}", "--resume", "--workdir=w")
  assert resumed.returncode == 0, resumed.stderr


def test_ctrl_c_while_sampling(cli_env, trained, tmp_path):
  proc = start(tmp_path, cli_env, "--workdir=w", "--max_new_tokens=20000",
               module="randygpt.sample")
  wait_for(proc, "Generating samples...")
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr


# Numerical.

def test_divergence_stops_and_keeps_the_last_good_checkpoint(run_cli, trained):
  result = run_cli("--data=c.txt", "--iters=40", "--resume", "--workdir=w",
                   "--learning_rate=1e38", "--lr_decay_iters=40", "--warmup_iters=0",
                   "--grad_clip=0", "--checkpoint_interval=1", "--log_interval=1")
  assert_clean_error(result, "Error: Training diverged at iteration ")
  assert "The last good checkpoint is kept: w/checkpoints/latest/" in result.stderr
  assert json.loads((trained / "summary.json").read_text())["status"] == "diverged"
  for kind in checkpoint.KINDS:
    state = restored_params(trained, kind)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"])), kind


# Sampling.

def sample(run_cli, *args):
  result = run_cli("--workdir=w", "--seed=3", *args, module="randygpt.sample")
  assert result.returncode == 0, result.stderr
  return result.stdout.split("Generating samples...\n\n", 1)[1]


@pytest.mark.parametrize("args, expected_start, n_new", [
    (["--prompt="], "\n", 30),  # The documented default: a newline.
    (["--prompt=" + make_corpus(100)], make_corpus(100), 30),  # Longer than block_size.
    (["--prompt=ANNA", "--max_new_tokens=0"], "ANNA", 0),
    (["--prompt=ANNA", "--top_p=1"], "ANNA", 30),
    (["--prompt=ANNA", "--top_k=100000"], "ANNA", 30),
], ids=["empty-prompt", "long-prompt", "no-new-tokens", "top-p-1", "top-k-past-vocab"])
def test_sampling_edge_cases(run_cli, trained, args, expected_start, n_new):
  printed = sample(run_cli, "--max_new_tokens=30", *args)
  assert printed.startswith(expected_start)
  assert len(printed) == len(expected_start) + n_new + len("\n\n")


def test_tiny_temperature_is_greedy(run_cli, trained):
  args = ("--prompt=ANNA", "--max_new_tokens=40")
  assert sample(run_cli, *args, "--temperature=1e-30") == sample(run_cli, *args,
                                                                   "--temperature=0")


# The report.

@pytest.mark.parametrize("name, content", [
    ("summary.json", b"[1, 2]"),
    ("summary.json", b"{\"iters\": 3}"),
    ("metrics.jsonl", b"\xff\xfe garbage\n[1]\n{\"x\": 1}\n"),
    ("flags.cfg", b"--learning_rate=\xe9\n"),
])
def test_report_survives_damaged_run_files(run_cli, trained, name, content):
  (trained / name).write_bytes(content)
  result = run_cli("w", module="randygpt.report")
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
  assert result.stdout.splitlines()[1].startswith("w")
