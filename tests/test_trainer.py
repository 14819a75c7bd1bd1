"""The whole training run in this process (`trainer.run`, what `python -m randygpt.main` runs):
what it writes and prints, what it refuses, and what it leaves behind."""

import dataclasses
import gzip
import hashlib
import json
import signal

import jax
import pytest

from randygpt import trainer

from conftest import (REPO, SHAKESPEARE, make_corpus, needs_shakespeare, parse_args,
                      raises_user_error, read_metrics, run_config, run_training, tiny, tree_bytes,
                      write_corpus)


def test_trains_writes_every_output_and_repeats_from_flags_cfg(tmp_path, capsys):
  corpus = write_corpus(tmp_path / "c.txt")
  workdir = tmp_path / "run1"
  summary = run_training(workdir, **tiny(data=corpus, iters=40, eval_interval=20,
                                             log_interval=10, checkpoint_interval=15,
                                             prompt=("ANNA:", "né"), max_new_tokens=30))
  stdout = capsys.readouterr().out
  for name in ("flags.cfg", "vocab.json", "metrics.jsonl", "summary.json", "samples.txt",
               "run.json", "run.lock"):
    assert (workdir / name).is_file(), name
  assert "Compiling train step" in stdout and "iter   40 | loss" in stdout

  records = read_metrics(workdir)
  assert [r["iter"] for r in records] == [10, 20, 30, 40]
  for key in ("iter", "train_loss", "lr", "tokens_per_sec", "wall_s"):
    assert all(key in r for r in records), key
  evals = [r for r in records if "val_loss" in r]
  assert [r["iter"] for r in evals] == [20, 40] and all("eval_train_loss" in r for r in evals)
  assert records[-1]["train_loss"] < records[0]["train_loss"]

  assert json.loads((workdir / "summary.json").read_text()) == summary
  assert summary["status"] == "completed" and summary["iters"] == 40
  assert summary["final_val_loss"] == evals[-1]["val_loss"]
  assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
  for key in ("final_train_loss", "best_iter", "tokens_per_sec", "wall_s", "n_params"):
    assert summary[key] is not None, key
  # The final evaluation tiles the val split (600 tokens: 37 windows of 16), every window once.
  assert summary["final_val_full_windows"] == 37
  assert abs(summary["final_val_full"] - summary["final_val_loss"]) < 0.5
  full = summary["final_val_full"]
  assert f"Final val loss over the whole split: {full:.4f} (37 windows" in stdout

  samples = (workdir / "samples.txt").read_text(encoding="utf-8").split("\n\n")
  assert samples[0].startswith("ANNA:") and samples[1].startswith("né")
  assert samples[0] in stdout

  # The automatic choices, said in the header, are recorded; flags.cfg, read by absl as
  # --flagfile, repeats the run exactly.
  assert "microbatch (automatic: slices of " in stdout
  recorded = (workdir / "flags.cfg").read_text().splitlines()
  assert "--microbatches=1" in recorded and "--num_cpu_devices=2" in recorded
  again = trainer.run(parse_args(f"--flagfile={workdir / 'flags.cfg'}",
                                 f"--workdir={tmp_path / 'run2'}"))
  assert again["status"] == "completed" and again["final_val_full"] == summary["final_val_full"]
  same = ("iter", "train_loss", "val_loss", "eval_train_loss", "lr")
  assert ([{k: r.get(k) for k in same} for r in read_metrics(tmp_path / "run2")]
          == [{k: r.get(k) for k in same} for r in records])
  assert (tmp_path / "run2" / "samples.txt").read_text() == (workdir / "samples.txt").read_text()


def test_without_train_txt_uses_the_builtin_sample(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # No train.txt here.
  summary = run_training("w", **tiny(iters=2))
  assert summary["status"] == "completed"
  stdout = capsys.readouterr().out
  assert "train.txt not found" in stdout and "ROMEO:" in stdout


def test_a_run_leaves_no_global_jax_configuration_behind(tmp_path):
  """A run sets its default device, signal handlers and devices for its own duration only."""
  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  config_before = dict(jax.config.values)
  default_before = jax.numpy.zeros(()).devices()
  summary = run_training(tmp_path / "w", **tiny(data=write_corpus(tmp_path / "c.txt"), iters=2,
                                                    num_cpu_devices=1))
  assert summary["status"] == "completed"
  assert dict(jax.config.values) == config_before  # jax_default_device too (conftest's).
  assert jax.numpy.zeros(()).devices() == default_before == {jax.devices("cpu")[0]}
  assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_finished_run_has_nothing_to_train(trained, capsys):
  assert run_training("w", iters=20, resume=True) == {"status": "nothing to train"}
  assert ("Already at iteration 20 (target 20). Nothing to train. Pass a higher --iters to "
          "train further.") in capsys.readouterr().out


def test_the_run_records_its_text_and_warns_once_when_it_changed_on_resume(trained, capsys):
  start = json.loads((trained / "run.json").read_text())["starts"][0]
  text = (trained.parent / "c.txt").read_bytes()
  # The hash: SHA-256 of the SHA-256s of the file's 64 MB pieces (here, one piece).
  assert start["data"]["files"] == [{"path": "c.txt", "bytes": len(text), "hash": hashlib.sha256(
      hashlib.sha256(text).digest()).hexdigest()}]
  capsys.readouterr()
  assert run_training("w", iters=22, resume=True)["status"] == "completed"  # Same text.
  assert "is not the text" not in capsys.readouterr().out
  edited = "\n".join(reversed(text.decode().split("\n"))).encode()  # Same characters.
  (trained.parent / "c.txt").write_bytes(edited)
  assert run_training("w", iters=24, resume=True)["status"] == "completed"
  warnings = [line for line in capsys.readouterr().out.splitlines() if "is not the text" in line]
  assert len(warnings) == 1 and warnings[0].startswith("⚠ --data=c.txt"), warnings
  starts = json.loads((trained / "run.json").read_text())["starts"]
  assert [s["iter"] for s in starts] == [0, 20, 22]
  assert starts[2]["data"]["files"][0]["hash"] == hashlib.sha256(
      hashlib.sha256(edited).digest()).hexdigest()


@pytest.mark.slow
@needs_shakespeare
def test_shakespeare_loss_falls(tmp_path, capsys):
  trainer.run(parse_args(f"--flagfile={REPO / 'experiments' / 'shakespeare.cfg'}",
                         f"--data={SHAKESPEARE}", "--iters=100", "--eval_interval=50",
                         "--max_new_tokens=50", f"--workdir={tmp_path / 'shake'}"))
  stdout = capsys.readouterr().out
  assert "1,115,394 characters | vocab 65" in stdout
  assert "1,204,480 parameters" in stdout
  evals = [r for r in read_metrics(tmp_path / "shake") if "val_loss" in r]
  assert evals[0]["val_loss"] < 3.5 and evals[1]["val_loss"] < evals[0]["val_loss"] - 0.2


def gpu_stand_in(asked: list):
  """A `place` that records the --train_platform it is asked for and trains on the CPU
  devices as the GPU would be named ("gpu"), so that a GPU run's choices happen here."""
  from randygpt.runtime import platforms

  def place(train_platform, eval_platform, num_cpu_devices=0):
    asked.append(train_platform)
    placement = platforms.place("cpu", eval_platform, 1)
    return dataclasses.replace(placement, train_platform="gpu" if train_platform in (
        "gpu", "auto") else "cpu")
  return place


@pytest.mark.parametrize("given", [{}, {"train_platform": "cpu"}])
def test_a_resumed_gpu_run_keeps_its_platform_and_compute(tmp_path, capsys, given):
  corpus = write_corpus(tmp_path / "c.txt")
  asked, workdir = [], tmp_path / "gpu"
  # n_head 8: head_dim 4, which cuDNN's attention cannot run (it would not on the CPU).
  first = trainer.run(run_config(workdir=workdir, **tiny(data=corpus, iters=2, n_head=8,
                                                         train_platform="auto")),
                      gpu_stand_in(asked))
  recorded = (workdir / "flags.cfg").read_text().splitlines()
  assert {"--train_platform=auto", "--compute_dtype=bfloat16", "--attention=einsum",
          "--microbatches=1"} <= set(recorded)
  assert "| bfloat16 matmuls, einsum attention |" in capsys.readouterr().out
  resumed = trainer.run(run_config(workdir=workdir, resume=True,
                                   **tiny(data=corpus, iters=4, n_head=8), **given),
                        gpu_stand_in(asked))
  assert first["status"] == resumed["status"] == "completed" and resumed["iters"] == 4
  assert asked == ["auto", given.get("train_platform", "auto")]
  # The compute is the checkpoint's wherever the resume trains (--compute_dtype changes it).
  assert "| bfloat16 matmuls, einsum attention |" in capsys.readouterr().out


@pytest.mark.slow
def test_shakespeare_char_cfg_trains_on_the_cpu(tmp_path, capsys):
  """nanoGPT's GPU preset, where JAX has no GPU: the CPU trains it (two steps here)."""
  corpus = write_corpus(tmp_path / "c.txt", 6000)
  summary = trainer.run(parse_args(f"--flagfile={REPO / 'experiments' / 'shakespeare_char.cfg'}",
                                   f"--data={corpus}", "--iters=2", "--eval_interval=2",
                                   "--eval_iters=1", "--batch_size=4", "--max_new_tokens=5",
                                   f"--workdir={tmp_path / 'char'}"))
  stdout = capsys.readouterr().out
  assert summary["status"] == "completed" and summary["iters"] == 2
  assert "6 layers, 6 heads, n_embd 384, block 256, dropout 0.2" in stdout
  assert "x cpu (data-parallel" in stdout and "matmuls" not in stdout
  assert "--train_platform=auto" in (tmp_path / "char" / "flags.cfg").read_text()


WHITESPACE = " \n\t\r\n "


def write(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  return path


# The flags' own refusals (absl's) are in test_cli.py; the CLI's one-line form in test_main.py.
@pytest.mark.parametrize("make_values, message", [
    (lambda p: {"data": "missing.txt"}, "--data=missing.txt does not exist"),
    (lambda p: {"data": write(p, "e.txt", "")}, "is empty"),
    (lambda p: {"data": write(p, "b.bin", bytes(range(256)))}, "binary file"),
    (lambda p: {"data": write(p, "w.txt", WHITESPACE)}, "is empty (only whitespace)"),
    (lambda p: {"data": write(p, "g.gz", gzip.compress(make_corpus().encode()))},
     "binary file"),
    (lambda p: {"data": write(p, "r.bin", bytes(range(1, 256)) * 8)}, "binary file"),
    (lambda p: {"data": write(p, "l.txt", "café crème ".encode("latin-1") * 100)},
     "is not valid utf-8 text"),
    (lambda p: {"data": write(p, "s.txt", "x" * 150)}, "too short"),
    (lambda p: {"data": write(p, "c.txt", make_corpus()), "prompt": "QX~"},
     "not in the training text's vocabulary: 'Q' 'X' '~'"),
    (lambda p: {"data": p}, "is a directory"),
    (lambda p: {"workdir": write(p, "afile", "x")}, "is a file, not a directory"),
], ids=["missing", "empty", "binary", "whitespace", "gzip", "control-bytes", "latin-1",
        "too-short", "prompt", "directory", "workdir-is-a-file"])
def test_bad_input_gets_a_short_clear_error(tmp_path, monkeypatch, make_values, message):
  monkeypatch.chdir(tmp_path)
  values = tiny(workdir="w") | make_values(tmp_path)
  before = tree_bytes(tmp_path)
  with raises_user_error(message):
    run_training(**values)
  assert {p: b for p, b in tree_bytes(tmp_path).items() if p in before} == before
