"""End-to-end: the real `python -m randygpt.main` as a subprocess, on small settings."""

import gzip
import json

import pytest

from conftest import REPO, SHAKESPEARE, make_corpus, needs_shakespeare

TINY = ["--n_embd=32", "--n_head=4", "--n_layer=2", "--block_size=32", "--batch_size=8",
        "--max_new_tokens=40"]


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_clean_error(result, message):
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert message in result.stderr, result.stderr


@pytest.mark.slow
def test_trains_writes_every_output_and_repeats_from_flags_cfg(run_cli, corpus_file, tmp_path):
  result = run_cli(f"--data={corpus_file}", *TINY, "--iters=40", "--eval_interval=20",
                   "--log_interval=10", "--prompt=ANNA:", "--prompt=né", "--workdir=run1")
  assert result.returncode == 0, result.stderr
  workdir = tmp_path / "run1"
  for name in ("flags.cfg", "vocab.json", "metrics.jsonl", "summary.json", "samples.txt",
               "run.json", "run.lock"):
    assert (workdir / name).is_file(), name
  assert "Compiling train step" in result.stdout and "iter   40 | loss" in result.stdout

  records = read_metrics(workdir)
  assert [r["iter"] for r in records] == [10, 20, 30, 40]
  for key in ("iter", "train_loss", "lr", "tokens_per_sec", "wall_s"):
    assert all(key in r for r in records), key
  evals = [r for r in records if "val_loss" in r]
  assert [r["iter"] for r in evals] == [20, 40] and all("eval_train_loss" in r for r in evals)
  assert records[-1]["train_loss"] < records[0]["train_loss"]

  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["iters"] == 40
  assert summary["final_val_loss"] == evals[-1]["val_loss"]
  assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
  for key in ("final_train_loss", "best_iter", "tokens_per_sec", "wall_s", "n_params"):
    assert summary[key] is not None, key

  samples = (workdir / "samples.txt").read_text(encoding="utf-8").split("\n\n")
  assert samples[0].startswith("ANNA:") and samples[1].startswith("né")
  assert samples[0] in result.stdout

  again = run_cli(f"--flagfile={workdir / 'flags.cfg'}", "--workdir=run2")
  assert again.returncode == 0, again.stderr
  same = ("iter", "train_loss", "val_loss", "eval_train_loss", "lr")
  assert ([{k: r.get(k) for k in same} for r in read_metrics(tmp_path / "run2")]
          == [{k: r.get(k) for k in same} for r in records])
  assert (tmp_path / "run2" / "samples.txt").read_text() == (workdir / "samples.txt").read_text()


def test_without_train_txt_uses_the_builtin_sample(run_cli):
  result = run_cli(*TINY, "--iters=2", "--eval_iters=1")
  assert result.returncode == 0, result.stderr
  assert "train.txt not found" in result.stdout and "ROMEO:" in result.stdout


@pytest.mark.slow
@needs_shakespeare
def test_shakespeare_loss_falls(run_cli, tmp_path):
  result = run_cli(f"--flagfile={REPO / 'experiments' / 'shakespeare.cfg'}",
                   f"--data={SHAKESPEARE}", "--iters=100", "--eval_interval=50",
                   "--max_new_tokens=50", "--workdir=shake")
  assert result.returncode == 0, result.stderr
  assert "1,115,394 characters | vocab 65" in result.stdout
  assert "1,204,480 parameters" in result.stdout
  evals = [r for r in read_metrics(tmp_path / "shake") if "val_loss" in r]
  assert evals[0]["val_loss"] < 3.5 and evals[1]["val_loss"] < evals[0]["val_loss"] - 0.2


WHITESPACE = " \n\t\r\n "


def write(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  return path


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["--data=missing.txt"], "--data=missing.txt does not exist"),
    (lambda p: [f"--data={write(p, 'e.txt', '')}"], "is empty"),
    (lambda p: [f"--data={write(p, 'b.bin', bytes(range(256)))}"], "binary file"),
    (lambda p: [f"--data={write(p, 'w.txt', WHITESPACE)}"], "is empty (only whitespace)"),
    (lambda p: [f"--data={write(p, 'g.gz', gzip.compress(make_corpus().encode()))}"],
     "binary file"),
    (lambda p: [f"--data={write(p, 'r.bin', bytes(range(1, 256)) * 8)}"], "binary file"),
    (lambda p: [f"--flagfile={write(p, 't.cfg', '--n_embed=64')}"],
     "Error: Unknown command line flag 'n_embed'. Did you mean: n_embd ? (--helpshort "
     "lists the flags.)"),
    (lambda p: [f"--data={write(p, 'l.txt', 'café crème '.encode('latin-1') * 100)}"],
     "is not valid utf-8 text"),
    (lambda p: [f"--data={write(p, 's.txt', 'x' * 300)}"], "too short"),
    (lambda p: [f"--data={write(p, 'c.txt', make_corpus())}", "--prompt=QX~"],
     "not in the training text's vocabulary: 'Q' 'X' '~'"),
    (lambda p: [f"--data={p}"], "is a directory"),
    (lambda p: [f"--workdir={write(p, 'afile', 'x')}"], "is a file, not a directory"),
    (lambda p: ["--n_head=5"], "--n_embd must be divisible by --n_head"),
    (lambda p: ["--top_p=2"], "--top_p must be in (0, 1]"),
    (lambda p: ["--iters=0"], "--iters"),
    (lambda p: ["--n_embed=64"], "Unknown command line flag 'n_embed'"),
    (lambda p: ["--flagfile=nope.cfg"],
     "Error: Could not read a --flagfile ([Errno 2] No such file or directory: 'nope.cfg')"),
    (lambda p: ["stray"], "Unexpected arguments: stray"),
])
def test_bad_input_gets_a_short_clear_error(run_cli, tmp_path, make_args, message):
  result = run_cli(*TINY, *make_args(tmp_path))
  assert_clean_error(result, message)
  assert len(result.stderr.strip().splitlines()) <= 3, result.stderr

