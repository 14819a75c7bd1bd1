"""`python -m randygpt.bench`: runs and reports every number (no timing is asserted)."""

import json

import pytest

from conftest import make_corpus

KEYS = ("compile_s", "ms_per_step", "tokens_per_sec", "eval_tokens_per_sec",
        *(f"generate_{case}_x{streams}_tokens_per_sec"
          for case in ("window_cached", "window_uncached", "500_cached") for streams in (1, 8)),
        "checkpoint_save_blocked_ms",
        "checkpoint_blocked_overhead_pct", "checkpoint_total_overhead_pct", "bench_peak_rss_mb",
        "mfu_pct", "peak_gflops", "startup_cold_s", "startup_warm_s", "rss_after_imports_mb",
        "rss_compile_peak_mb", "rss_steady_mb")


def test_bench_reports_json_and_a_table(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  args = ["--data=c.txt", "--n_embd=32", "--n_head=4", "--n_layer=1", "--block_size=16",
          "--batch_size=4", "--eval_iters=2", "--max_new_tokens=10", "--steps=3",
          "--warmup_steps=1", "--saves=1", "--run_iters=20", "--log_interval=5"]
  result = run_cli(*args, "--json", module="randygpt.bench")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for key in KEYS:
    assert isinstance(report[key], (int, float)) and report[key] >= 0, key
  assert report["n_params"] > 0 and report["tokens_per_sec"] > 0
  assert 0 < report["mfu_pct"] < 100
  assert report["rss_after_imports_mb"] < report["rss_compile_peak_mb"]
  # The second run found the first one's compilation in the cache.
  assert report["startup_warm_s"] < report["startup_cold_s"]
  table = run_cli(*args, module="randygpt.bench")
  assert table.returncode == 0, table.stderr
  assert "checkpoint save blocks the loop" in table.stdout
  assert "training throughput" in table.stdout
  assert "generation in the window, 8 stream(s)" in table.stdout
  assert "start-up to first iteration" in table.stdout


def test_bench_times_the_pytorch_reference_beside_randygpt(run_cli, tmp_path):
  pytest.importorskip("torch", reason="the PyTorch reference is optional")
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  result = run_cli("--data=c.txt", "--n_embd=32", "--n_head=4", "--n_layer=1",
                   "--block_size=16", "--batch_size=4", "--eval_iters=2", "--max_new_tokens=10",
                   "--steps=3", "--warmup_steps=1", "--saves=1", "--run_iters=0", "--torch",
                   module="randygpt.bench")
  assert result.returncode == 0, result.stderr
  assert "PyTorch 2." in result.stdout and "randygpt / PyTorch" in result.stdout
  assert "start-up" not in result.stdout  # --run_iters=0 skips the training runs.
