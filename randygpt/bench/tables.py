"""The one-shape report and the text-size runs as printed tables."""

from randygpt.bench.steps import GENERATION_STREAMS, LONG_GENERATION


def generation_rows(result) -> list:
  rows = []
  for streams in (1, GENERATION_STREAMS):
    speeds = {case: result[f"generate_{case}_x{streams}_tokens_per_sec"]
              for case in ("window_cached", "window_uncached", f"{LONG_GENERATION}_cached")}
    rows += [
        (f"generation in the window, {streams} stream(s)",
         f"{speeds['window_cached']:,.0f} tokens/s cached, {speeds['window_uncached']:,.0f} "
         f"uncached ({speeds['window_cached'] / speeds['window_uncached']:.1f}x)"),
        (f"generation of {LONG_GENERATION} tokens, {streams} stream(s)",
         f"{speeds[f'{LONG_GENERATION}_cached']:,.0f} tokens/s"),
    ]
  return rows


def table_rows(result: dict) -> list[tuple[str, str]]:
  """The benchmark's result as (name, value) rows of the printed table."""
  rows = [
      ("shape", result["shape"]),
      ("parameters", f"{result['n_params']:,}"),
      ("devices", f"{result['devices']}, {result['microbatches']} microbatch(es) per step"),
      ("compile train step", f"{result['compile_s']:.2f} s"),
      ("train step (median, p10-p90)", f"{result['ms_per_step']:.1f} ms "
       f"({result['ms_per_step_p10']:.1f}-{result['ms_per_step_p90']:.1f})"),
      ("training throughput", f"{result['tokens_per_sec']:,.0f} tokens/s"),
      ("model FLOPs utilisation", f"{result['mfu_pct']:.1f}% of {result['peak_gflops']:.0f} "
       f"GFLOP/s ({result['flops_per_token'] / 1e6:.2f} MFLOP/token; peak "
       f"{'given' if result.get('peak_given') else 'measured: f32 matmul 2048^3'})"),
  ]
  if "torch_ms_per_step" in result:
    rows += [
        (f"PyTorch {result['torch_version']} eager", f"{result['torch_ms_per_step']:.1f} ms "
         f"({result['torch_ms_per_step_p10']:.1f}-{result['torch_ms_per_step_p90']:.1f}), "
         f"{result['torch_tokens_per_sec']:,.0f} tokens/s, {result['torch_threads']} threads, "
         f"{result['torch_adamw']} AdamW"),
        ("randygpt / PyTorch", f"{result['speedup_vs_torch']:.2f}x tokens/s"),
    ]
  rows += [
      ("loss estimate throughput", f"{result['eval_tokens_per_sec']:,.0f} tokens/s"),
      ("evaluation and generation on", result["eval_device"]),
      *generation_rows(result),
      ("checkpoint save blocks the loop", f"{result['checkpoint_save_blocked_ms']:.1f} ms "
       f"(max {result['checkpoint_save_blocked_ms_max']:.1f}) = "
       f"{result['checkpoint_blocked_overhead_pct']:.3f}% at --checkpoint_interval="
       f"{result['checkpoint_interval']}"),
      ("checkpoint save, whole cost", f"{result['checkpoint_save_total_cost_ms']:.1f} ms = "
       f"{result['checkpoint_total_overhead_pct']:.3f}% (with vs without saves)"),
  ]
  if "startup_warm_s" in result:
    rows += [
        ("start-up to first iteration", f"{result['startup_cold_s']:.1f} s cold cache, "
         f"{result['startup_warm_s']:.1f} s warm (after the imports)"),
        ("training run memory (resident)", f"{result['rss_after_imports_mb']:.0f} MB after "
         f"imports, {result['rss_compile_peak_mb']:.0f} MB compile peak, "
         f"{result['rss_steady_mb']:.0f} MB steady (max of iterations "
         f"{result['rss_steady_iters'] // 2}-{result['rss_steady_iters']})"),
    ]
  rows.append(("benchmark process peak memory", f"{result['bench_peak_rss_mb']:.0f} MB"))
  return rows


def text_size_table(rows: list[dict]) -> str:
  lines = ["text          first start  second start  peak (first, second)"]
  for r in rows:
    lines.append(f"{r['text_bytes'] / 1e6:>8,.0f} MB  {r['first_startup_s']:>9.1f} s  "
                 f"{r['second_startup_s']:>10.1f} s  {r['first_peak_mb']:,.0f} MB, "
                 f"{r['second_peak_mb']:,.0f} MB")
  return "\n".join(lines)
