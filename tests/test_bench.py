"""`python -m randygpt.bench`: runs and reports every number (no timing is asserted)."""

import json

from conftest import make_corpus

KEYS = ("compile_s", "ms_per_step", "tokens_per_sec", "eval_tokens_per_sec",
        *(f"generate_{case}_x{streams}_tokens_per_sec"
          for case in ("window_cached", "window_uncached", "500_cached") for streams in (1, 8)),
        "checkpoint_save_blocked_ms",
        "checkpoint_blocked_overhead_pct", "checkpoint_total_overhead_pct", "peak_rss_mb")


def test_bench_reports_json_and_a_table(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  args = ["--data=c.txt", "--n_embd=32", "--n_head=4", "--n_layer=1", "--block_size=16",
          "--batch_size=4", "--eval_iters=2", "--max_new_tokens=10", "--steps=3",
          "--warmup_steps=1", "--saves=1"]
  result = run_cli(*args, "--json", module="randygpt.bench")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for key in KEYS:
    assert isinstance(report[key], (int, float)) and report[key] >= 0, key
  assert report["n_params"] > 0 and report["tokens_per_sec"] > 0
  table = run_cli(*args, module="randygpt.bench")
  assert table.returncode == 0, table.stderr
  assert "checkpoint save blocks the loop" in table.stdout
  assert "training throughput" in table.stdout
  assert "generation in the window, 8 stream(s)" in table.stdout
