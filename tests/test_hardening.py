"""Robustness of the whole program against hostile inputs and faults.

Each case ends in success or in a one-line UserError (which the CLI prints as one `Error:`
line with exit status 1: test_main.py), and no existing file damaged. The runs are in this
process, but for what needs its own process: a signal, or the read-only workdir of a root
that must drop its capabilities. docs/errors.md lists what each case
prints.
"""

import json
import os
import random
import resource
import shutil
import signal

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from randygpt import checkpoint, data, report, trainer
from randygpt.runtime import cli
from randygpt import flags as randygpt_flags

from conftest import (make_corpus, parse_args, parsed_flags, raises_user_error,
                      restored_state, run_training, sample_in_process, tiny, tree_bytes,
                      wait_for, write_corpus)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# Data.

@pytest.mark.parametrize("text, check", [
    ("a" * 500, lambda vocab: vocab == ["a"]),
    ("".join(map(chr, random.Random(1).choices(range(0x4E00, 0x4E00 + 4000), k=20000))),
     lambda vocab: len(vocab) > 3000),
    ("hello there,\r\ngeneral kenobi\r\n" * 40, lambda vocab: "\r" in vocab),
], ids=["one-character-vocabulary", "cjk-thousands-of-characters", "crlf"])
def test_unusual_texts_train_and_sample(tmp_path, capsys, text, check):
  (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
  summary = run_training(tmp_path / "w", **tiny(data=tmp_path / "t.txt", iters=2))
  assert summary["status"] == "completed"
  assert check(json.loads((tmp_path / "w" / "vocab.json").read_text(encoding="utf-8"))["chars"])
  assert "Generating samples..." in capsys.readouterr().out
  assert (tmp_path / "w" / "samples.txt").is_file()


def test_text_changed_before_the_resume_is_refused(trained):
  with open("c.txt", "a", encoding="utf-8") as f:
    f.write("Zebra!")  # Characters the first run's vocabulary lacks.
  before = tree_bytes(trained)
  with raises_user_error("Checkpoint vocab_size"):
    run_training("w", data="c.txt", iters=30, resume=True)
  assert tree_bytes(trained) == before


# Flags.

FLAGS = flags.FLAGS
NUMERIC = sorted(f.name for f in FLAGS.get_flags_for_module(randygpt_flags)
                 if isinstance(f.value, (int, float)) and not isinstance(f.value, bool))
# Values absl accepts, each run end to end below (with the tiny shape).
ACCEPTED_ZERO = {"dropout", "grad_clip", "lr_decay_iters", "max_new_tokens", "min_lr",
                 "microbatches", "num_cpu_devices", "process_id", "seed", "temperature", "top_k",
                 "warmup_iters", "weight_decay", "beta1", "beta2", "logit_softcap", "ema_decay"}
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


def test_accepted_zeros_and_negative_seed_run(tmp_path):
  corpus = write_corpus(tmp_path / "c.txt")
  # The flags parsed as the command line parses them (absl accepts each), then the run.
  args = [f"--data={corpus}", *(f"--{n}={v}" for n, v in tiny(iters=2).items())]
  zeros = [f"--{n}=0" for n in sorted(ACCEPTED_ZERO)]
  assert trainer.run(parse_args(*args, *zeros, f"--workdir={tmp_path / 'z'}"))[
      "status"] == "completed"
  assert trainer.run(parse_args(*args, "--seed=-5", f"--workdir={tmp_path / 'n'}"))[
      "status"] == "completed"


@pytest.mark.parametrize("name", sorted(HUGE))
def test_absurdly_large_shapes_are_refused_before_allocating(tmp_path, name):
  values = tiny(data=write_corpus(tmp_path / "c.txt"), n_head=1, **{name: HUGE[name]})
  with raises_user_error("This run needs about ") as info:
    run_training(tmp_path / "w", **values)
  assert f"--{name}" in str(info.value) and str(info.value).endswith("Make those smaller.")
  assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["run.lock"]


def test_sampling_refuses_a_huge_request_before_allocating(trained):
  with raises_user_error("--num_samples, --max_new_tokens. Make those smaller."):
    sample_in_process("--workdir=w", "--max_new_tokens=10000000000")


# Files.

# Orbax's failed background writes report to a closed event loop when collected; the CLI
# silences them (test_main.py), and that is expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(trained):
  before = tree_bytes(trained / "checkpoints")
  limit = min(len(b) for b in before.values() if len(b) > 10_000)  # Below a checkpoint file.
  # This process's files may not grow past `limit` while the run saves (Python ignores
  # SIGXFSZ, so a write past it fails with EFBIG, "File too large", as on a full disk).
  # The text's token cache is there before the limit (another test may have emptied the
  # cache directory): the save is under test.
  data.load_corpus("c.txt", cli.cache_dir("tokens"))
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    with raises_user_error("Could not save the ") as info:
      run_training("w", iters=30, resume=True)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  assert "File too large" in str(info.value) and "is kept" in str(info.value)
  for kind in checkpoint.KINDS:
    assert checkpoint.Checkpoints(trained).path(kind).name == "20"
  assert {p: b for p, b in tree_bytes(trained / "checkpoints").items()
          if "orbax-checkpoint-tmp" not in str(p)} == before
  assert json.loads((trained / "summary.json").read_text())["status"] == "failed"


def test_read_only_workdir_is_refused(run_cli, trained):
  # Root writes anywhere unless it drops the capabilities that override permissions: a
  # process of its own does.
  as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if IS_ROOT else []
  if as_user and not shutil.which("setpriv"):
    pytest.skip("running as root without setpriv, which writes to read-only directories")
  before = tree_bytes(trained)
  trained.chmod(0o555)
  try:
    result = run_cli("--data=c.txt", "--iters=30", "--resume", "--workdir=w", wrapper=as_user)
  finally:
    trained.chmod(0o755)
  assert result.returncode == 1, result.stderr
  assert result.stderr == ("Error: Cannot write to --workdir=w (Permission denied). Choose a "
                           "writable --workdir.\n")
  assert tree_bytes(trained) == before


def test_workdir_with_spaces_and_non_ascii_characters(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  write_corpus(tmp_path / "c.txt")
  workdir = "runs/my run ünïcødé ✓"
  assert run_training(workdir, **tiny(data="c.txt", iters=2))["status"] == "completed"
  capsys.readouterr()
  sample_in_process(f"--workdir={workdir}", "--prompt=ANNA")
  assert f"checkpoint: {workdir}/checkpoints/best/2" in capsys.readouterr().out


# Faults: signals, so the runs are processes of their own.

@pytest.mark.slow
@pytest.mark.parametrize("phase, args", [
    ("Compiling train step...", []),
    ("Evaluating at iteration 2...", ["--eval_iters=4000"]),
    ("Saving checkpoint at iteration 2...", ["--checkpoint_interval=2"]),
    ("Generating samples...", ["--max_new_tokens=5000", "--prompt=ANNA", "--prompt=BORIS"]),
])
def test_ctrl_c_in_each_phase_stops_cleanly_and_resumes(start_cli, tmp_path, tmp_path_factory,
                                                        monkeypatch, phase, args):
  write_corpus(tmp_path / "c.txt")
  cold = {"RANDYGPT_CACHE": str(tmp_path_factory.mktemp("cold"))}
  iters = "--iters=2" if phase == "Generating samples..." else "--iters=100000"
  proc = start_cli("--data=c.txt", *(f"--{n}={v}" for n, v in tiny(eval_interval=2).items()),
                   iters, *args, "--workdir=w", env=cold)
  before = wait_for(proc, phase)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=300)
  stdout = before + stdout
  assert proc.returncode == -signal.SIGINT, stderr
  assert "Traceback" not in stderr, stderr
  latest = checkpoint.Checkpoints(tmp_path / "w").path("latest")
  assert f"Saved latest checkpoint: w/checkpoints/latest/{latest.name}" in stdout
  monkeypatch.chdir(tmp_path)
  resumed = run_training("w", iters=int(latest.name) + 1, resume=True)
  assert resumed["status"] == "completed" and resumed["iters"] == int(latest.name) + 1


def test_ctrl_c_while_sampling(start_cli, trained):
  proc = start_cli("--workdir=w", "--max_new_tokens=20000", module="randygpt.sample")
  wait_for(proc, "Generating samples...")
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr


# Numerical.

def test_divergence_stops_and_keeps_the_last_good_checkpoint(trained):
  with raises_user_error("Training diverged at iteration ") as info:
    run_training("w", data="c.txt", iters=40, resume=True, learning_rate=1e38,
                 lr_decay_iters=40, warmup_iters=0, grad_clip=0, checkpoint_interval=1,
                 log_interval=1)
  assert "The last good checkpoint is kept: w/checkpoints/latest/" in str(info.value)
  assert json.loads((trained / "summary.json").read_text())["status"] == "diverged"
  for kind in checkpoint.KINDS:
    state = restored_state(trained, kind)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"])), kind


# Sampling.

def sample(capsys, *args):
  capsys.readouterr()
  sample_in_process("--workdir=w", "--seed=3", *args)
  return capsys.readouterr().out.split("Generating samples...\n\n", 1)[1]


@pytest.mark.parametrize("args, expected_start, n_new", [
    (["--prompt="], "\n", 30),  # The documented default: a newline.
    (["--prompt=" + make_corpus(100)], make_corpus(100), 30),  # Longer than block_size.
    (["--prompt=ANNA", "--max_new_tokens=0"], "ANNA", 0),
    (["--prompt=ANNA", "--top_p=1"], "ANNA", 30),
    (["--prompt=ANNA", "--top_k=100000"], "ANNA", 30),
], ids=["empty-prompt", "long-prompt", "no-new-tokens", "top-p-1", "top-k-past-vocab"])
def test_sampling_edge_cases(trained, capsys, args, expected_start, n_new):
  printed = sample(capsys, "--max_new_tokens=30", *args)
  assert printed.startswith(expected_start)
  assert len(printed) == len(expected_start) + n_new + len("\n\n")


def test_tiny_temperature_is_greedy(trained, capsys):
  args = ("--prompt=ANNA", "--max_new_tokens=40")
  assert sample(capsys, *args, "--temperature=1e-30") == sample(capsys, *args,
                                                                "--temperature=0")


# The report.

@pytest.mark.parametrize("name, content", [
    ("summary.json", b"[1, 2]"),
    ("summary.json", b"{\"iters\": 3}"),
    ("metrics.jsonl", b"\xff\xfe garbage\n[1]\n{\"x\": 1}\n"),
    ("flags.cfg", b"--learning_rate=\xe9\n"),
])
def test_report_survives_damaged_run_files(trained, capsys, name, content):
  (trained / name).write_bytes(content)
  with parsed_flags():
    report.report(["w"])
  assert capsys.readouterr().out.splitlines()[1].startswith("w")
