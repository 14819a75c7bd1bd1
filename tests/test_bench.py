"""The benchmark (`python -m randygpt.bench`), in this process: it measures and reports every
number (no timing is asserted). Its start-up and memory runs are processes by design."""

import json
import os
import subprocess
import sys

import pytest

from randygpt import bench

from conftest import REPO, run_config, tiny, write_corpus

KEYS = ("compile_s", "ms_per_step", "tokens_per_sec", "eval_tokens_per_sec",
        *(f"generate_{case}_x{streams}_tokens_per_sec"
          for case in ("window_cached", "window_uncached", "500_cached") for streams in (1, 8)),
        "checkpoint_save_blocked_ms",
        "checkpoint_blocked_overhead_pct", "checkpoint_total_overhead_pct", "bench_peak_rss_mb",
        "mfu_pct", "peak_gflops", "startup_cold_s", "startup_warm_s", "rss_after_imports_mb",
        "rss_compile_peak_mb", "rss_steady_mb")


def config(tmp_path, **values):
  return run_config(**tiny(data=write_corpus(tmp_path / "c.txt"), max_new_tokens=10,
                           log_interval=5, **values))


@pytest.mark.slow
def test_bench_reports_json_and_a_table(tmp_path):
  bench_config = config(tmp_path)
  result = bench.measure(bench_config, steps=3, warmup_steps=1, saves=1, with_torch=False,
                         peak_gflops=0.0)
  result |= bench.measure_training_runs(bench_config, 20)
  report = json.loads(json.dumps(result))  # What --json prints.
  for key in KEYS:
    assert isinstance(report[key], (int, float)) and report[key] >= 0, key
  assert report["n_params"] > 0 and report["tokens_per_sec"] > 0
  assert 0 < report["mfu_pct"] < 100
  assert report["rss_after_imports_mb"] < report["rss_compile_peak_mb"]
  # The second run found the first one's compilation in the cache.
  assert report["startup_warm_s"] < report["startup_cold_s"]
  table = dict(bench.table_rows(result))
  for row in ("checkpoint save blocks the loop", "training throughput",
              "generation in the window, 8 stream(s)", "start-up to first iteration"):
    assert row in table, row


@pytest.mark.slow
def test_bench_times_the_pytorch_reference_beside_randygpt(tmp_path):
  pytest.importorskip("torch", reason="the PyTorch reference is optional")
  result = bench.measure(config(tmp_path), steps=3, warmup_steps=1, saves=1, with_torch=True,
                         peak_gflops=0.0)
  table = bench.table_rows(result)
  assert any(name.startswith("PyTorch 2.") for name, _ in table)
  assert "randygpt / PyTorch" in dict(table)
  assert "start-up to first iteration" not in dict(table)  # No training runs asked for.


def test_shapes_are_presets_or_six_numbers(tmp_path):
  assert bench.parse_shape("nanogpt") == (4, 4, 128, 64, 12, 0.0)
  assert bench.parse_shape("3/4/96/256/8/0.1") == (3, 4, 96, 256, 8, 0.1)
  shaped = bench.shape_config(config(tmp_path), "medium")
  assert (shaped.model.n_embd, shaped.model.block_size, shaped.train.batch_size) == (256, 128, 32)
  for wrong in ("huge", "4/4/128/64/12", "4/4/x/64/12/0"):
    with pytest.raises(bench.UserError, match="neither a preset"):
      bench.parse_shape(wrong)


def test_nanogpt_timing_comes_from_the_shared_script(tmp_path):
  script = tmp_path / "fake.sh"
  script.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                    'echo "nanoGPT median 12.5 ms/iter over 5 iterations"\n')
  script.chmod(0o755)
  shaped = bench.shape_config(config(tmp_path), "nanogpt")
  assert bench.nanogpt_ms(str(script), shaped, 15) == 12.5
  assert (tmp_path / "args").read_text().split() == "4 4 128 64 12 0.0 15".split()
  script.write_text("#!/bin/sh\necho 'set NANOGPT_GIT' >&2\nexit 1\n")
  with pytest.raises(bench.UserError, match="nanoGPT timing failed.*NANOGPT_GIT"):
    bench.nanogpt_ms(str(script), shaped, 15)


def test_nanogpt_is_prepared_before_any_timing(tmp_path, monkeypatch):
  """The script's one-time work runs first, with --nanogpt_git passed on as NANOGPT_GIT and
  this interpreter as NANOGPT_PYTHON; a script missing or failing is refused at once."""
  from conftest import raises_user_error
  monkeypatch.delenv("NANOGPT_GIT", raising=False)
  monkeypatch.delenv("NANOGPT_PYTHON", raising=False)
  script = tmp_path / "fake.sh"
  script.write_text('#!/bin/sh\necho "$@ $NANOGPT_GIT $NANOGPT_PYTHON" > "$(dirname "$0")/args"\n')
  with raises_user_error(f"--nanogpt_script={script} is not an executable script; "
                         "--nanogpt_iters=0 leaves nanoGPT out."):
    bench.prepare_nanogpt(str(script), "")
  script.chmod(0o755)
  bench.prepare_nanogpt(str(script), "https://example.org/nanoGPT")
  assert (tmp_path / "args").read_text().split() == [
      "--prepare", "https://example.org/nanoGPT", sys.executable]
  script.write_text("#!/bin/sh\necho 'nanoGPT is not checked out' >&2\nexit 1\n")
  with pytest.raises(bench.UserError, match="nanoGPT timing failed.*not checked out"):
    bench.prepare_nanogpt(str(script), "")


def test_the_nanogpt_runner_is_the_repository_s_own(tmp_path):
  """tools/nanogpt-bench.sh (the default --nanogpt_script) fetches nothing unasked, and writes
  nanoGPT's character data as its prepare.py does: sorted characters, the first 90% to train."""
  import numpy as np
  from absl import flags as absl_flags

  from randygpt.bench.__main__ import CORES_OWN_FLAGS  # Defines the benchmark's flags.
  assert "nanogpt_git" in CORES_OWN_FLAGS  # The parent fetches; its pinned children never.
  script = absl_flags.FLAGS["nanogpt_script"].default
  assert script == str(REPO / "tools" / "nanogpt-bench.sh")
  env = {**os.environ, "NANOGPT_DIR": str(tmp_path / "nanogpt"), "NANOGPT_PYTHON": sys.executable,
         "NANOGPT_TEXT": str(tmp_path / "t.txt")}
  env.pop("NANOGPT_GIT", None)
  done = subprocess.run([script, "--prepare"], capture_output=True, text=True, env=env)
  assert done.returncode == 1 and not (tmp_path / "nanogpt").exists()
  assert "pass --nanogpt_git=https://github.com/karpathy/nanoGPT" in done.stderr
  (tmp_path / "nanogpt").mkdir()
  (tmp_path / "nanogpt" / "train.py").write_text("")  # A checkout, as far as the script asks.
  (tmp_path / "t.txt").write_text("abcab" * 20 + "zé", encoding="utf-8")
  subprocess.run([script, "--prepare"], check=True, env=env)
  data = tmp_path / "nanogpt" / "data" / "randygpt_shakespeare_char"
  train, val = (np.fromfile(data / f"{part}.bin", dtype=np.uint16) for part in ("train", "val"))
  assert len(train) == 91 and len(val) == 11 and list(train[:5]) == [0, 1, 2, 0, 1]
  assert list(val[-2:]) == [3, 4]  # "z" then "é", the last two of the sorted characters.


@pytest.mark.slow
def test_shapes_table_times_randygpt_beside_the_peers(tmp_path):
  pytest.importorskip("torch", reason="the PyTorch reference is optional")
  rows = bench.measure_shapes(config(tmp_path), ["2/2/16/16/4/0.1"], steps=2, warmup_steps=1,
                              repeats=2, loop_iters=0, nanogpt_iters=0, script="")
  (row,) = rows
  assert len(row["rounds"]["randygpt"]) == len(row["rounds"]["torch_reference"]) == 2
  assert row["nanogpt"] is None and row["step_vs_faster_peer"] > 0
  assert "| 2/2/16/16/4/0.1 |" in bench.shapes_table(rows)


def test_the_pytorch_reference_is_refused_with_levers(tmp_path):
  from conftest import raises_user_error
  with raises_user_error("--torch times randyGPT's architecture with AdamW, not --position, "
                         "--optimizer: drop those flags or --torch."):
    bench.measure(config(tmp_path, position="rope", optimizer="muon"), steps=1,
                  warmup_steps=0, saves=1, with_torch=True, peak_gflops=0.0)


def test_the_benchmark_times_the_run_s_step(tmp_path):
  """bench.prepare_step makes the step through the run's code: its first step, on the run's
  first batch with the run's dropout key, gives the loss the run logs at iteration 1."""
  import jax

  from conftest import read_metrics, run_training
  values = tiny(data=write_corpus(tmp_path / "c.txt"), dropout=0.1, iters=1, log_interval=1)
  run_training(tmp_path / "w", **values)
  prepared = bench.prepare_step(run_config(**values))
  _, step_metrics = prepared.compile()(prepared.state, prepared.batch,
                                       jax.random.fold_in(prepared.rng, 1))
  assert float(step_metrics["loss"]) == read_metrics(tmp_path / "w")[0]["train_loss"]
  recorded = (tmp_path / "w" / "flags.cfg").read_text()
  assert f"--microbatches={prepared.config.train.microbatches}\n" in recorded


def test_variants_time_the_step_once_per_setting_as_given(tmp_path, capsys):
  from randygpt.bench.variants import measure_variants
  rows = measure_variants(config(tmp_path), ["compute_dtype=float32/attention=einsum",
                                             "compute_dtype=bfloat16/attention=xla/microbatches=2"],
                          steps=2, warmup_steps=1)
  assert [(r["compute_dtype"], r["attention"], r["microbatches"]) for r in rows] == [
      ("float32", "einsum", 1), ("bfloat16", "xla", 2)]
  assert all(r["ms_per_step"] > 0 and r["device_peak_mb"] is None for r in rows)  # The CPU's.
  assert capsys.readouterr().out.splitlines()[0].startswith("| compute dtype | attention |")


@pytest.mark.parametrize("text, message", [
    ("dtype=float32", "'dtype=float32' is not NAME=VALUE"),
    ("attention=", "'attention=' is not NAME=VALUE"),
    ("microbatches=two", "'microbatches=two': microbatches takes a number"),
])
def test_variants_refuse_what_they_cannot_set(text, message):
  from randygpt.bench.variants import parse_variant
  from randygpt.errors import UserError
  with pytest.raises(UserError, match=message):
    parse_variant(text)
