"""The benchmark (`python -m randygpt.bench`), in this process: it measures and reports every
number (no timing is asserted). Its start-up and memory runs are processes by design."""

import json

import pytest

from randygpt import bench

from conftest import run_config, tiny, write_corpus

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


def test_the_pytorch_reference_is_refused_with_levers(tmp_path):
  from conftest import raises_user_error
  with raises_user_error("--torch times randyGPT's architecture with AdamW, not --position, "
                         "--optimizer: drop those flags or --torch."):
    bench.measure(config(tmp_path, position="rope", optimizer="muon"), steps=1,
                  warmup_steps=0, saves=1, with_torch=True, peak_gflops=0.0)
