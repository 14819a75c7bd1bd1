"""Speed and cost, measured: `python -m randygpt.bench --flagfile=experiments/shakespeare.cfg`.

Times the real jitted train step after compilation and warm-up (and, with --torch, a
PyTorch eager implementation of the same model beside it), model FLOPs utilisation
against a measured matmul peak, the loss estimate, the generation loop and an async
checkpoint save (how long it blocks the loop, and that cost spread over
--checkpoint_interval steps). Then runs the real training program twice in fresh
workdirs sharing a new compilation cache: the start-up time of a cold and a warm cache,
and the resident memory after imports, at the compilation peak and in the steady state.
Prints a table, or one JSON line.
"""

import json
import sys
from pathlib import Path

from absl import app
from absl import flags

from randygpt.runtime import cli
from randygpt import flags as randygpt_flags
from randygpt.bench.cores import measure_cores, time_runner
from randygpt.bench.peers import prepare_nanogpt
from randygpt.bench.runs import measure_text_sizes, measure_training_runs
from randygpt.bench.shapes import measure_shapes
from randygpt.bench.steps import measure
from randygpt.bench.tables import table_rows, text_size_table
from randygpt.bench.variants import measure_variants
from randygpt.errors import UserError

flags.DEFINE_integer("steps", 50, "Timed training steps (after warm-up).", lower_bound=1)
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps after compilation.", lower_bound=0)
flags.DEFINE_integer("saves", 5, "Timed checkpoint saves (one every 10 steps).",
                     lower_bound=1)
flags.DEFINE_bool("torch", False, "Also time randygpt's PyTorch eager reference "
                  "(randygpt/torch_reference.py; pip install torch==2.13.0).")
flags.DEFINE_float("peak_gflops", 0.0, "The peak that model FLOPs utilisation is stated "
                   "against, in GFLOP/s; 0 measures a large f32 matmul on the training "
                   "devices.", lower_bound=0.0)
flags.DEFINE_integer("run_iters", 200, "Iterations of the real training run that measures "
                     "start-up and memory (its second half is the steady state); 0 skips it.",
                     lower_bound=0)
flags.DEFINE_list("text_sizes", [], "Measure start-up and peak memory against the text's "
                  "size instead: --data repeated to each of these sizes in bytes, e.g. "
                  "1e6,1e8,1e9 (first start builds the token cache, second reuses it).")
flags.DEFINE_list("variants", [], "Instead of the one-shape report: time the train step once "
                  "per variant of how it computes, in one process, e.g. "
                  "compute_dtype=float32/attention=einsum,compute_dtype=bfloat16/attention=cudnn"
                  " (settings: compute_dtype, attention, microbatches).")
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_list("shapes", [], "Instead of the one-shape report: time randygpt's train step "
                  "beside both PyTorch peers (randygpt/torch_reference.py and nanoGPT's own "
                  "train.py) at these shapes, interleaved, in one table. Preset names ("
                  "tiny, nanogpt, default, default-d0, medium) or L/H/D/T/B/dropout, e.g. "
                  "4/4/128/64/12/0. The other flags (--steps, the learning rate...) apply.")
flags.DEFINE_integer("shape_repeats", 3, "With --shapes: rounds of randygpt, PyTorch, nanoGPT "
                     "(and the real loop) in turn; the table gives their medians.", lower_bound=1)
flags.DEFINE_integer("loop_iters", 0, "With --shapes: also time the real training loop "
                     "(randygpt.main, warm compilation cache) over this many iterations; "
                     "0 skips it.", lower_bound=0)
flags.DEFINE_integer("nanogpt_iters", 30, "With --shapes: iterations of each nanoGPT run (its "
                     "first 10 untimed); 0 skips nanoGPT.", lower_bound=0)
flags.DEFINE_string("nanogpt_script", str(Path(__file__).resolve().parents[2] / "tools" /
                                          "nanogpt-bench.sh"),
                    "With --shapes: the script that times nanoGPT's train.py at a shape "
                    "(N_LAYER N_HEAD N_EMBD BLOCK BATCH DROPOUT ITERS).")
flags.DEFINE_string("nanogpt_git", "", "With --shapes: where to fetch nanoGPT from on first use "
                    "(a URL such as https://github.com/karpathy/nanoGPT, or a local clone); "
                    "the script keeps its checkout and never fetches unasked.")
flags.DEFINE_list("cores", [], "With --shapes: time them on the first k cores of this "
                  "machine for each k given, e.g. 4,8,16: randygpt's automatic placement, half "
                  "and double its devices, torch_reference and nanoGPT, each a process pinned "
                  "to those cores with that many threads, --shape_repeats interleaved rounds.")
flags.DEFINE_bool("core_brackets", True, "With --cores: also time half and double randygpt's "
                  "automatic device count.")
flags.DEFINE_enum("core_runner", "", ["", "randygpt", "torch_reference"], "What one process "
                  "of --cores times once at its one --shapes, printed as JSON (--cores starts "
                  "these).")
flags.adopt_module_key_flags(randygpt_flags)

# The parent's own flags, which --cores does not pass on to its pinned processes.
CORES_OWN_FLAGS = ("cores", "core_brackets", "core_runner", "shapes", "json", "shape_repeats",
                   "num_cpu_devices", "nanogpt_iters", "nanogpt_script", "nanogpt_git",
                   "loop_iters")


def child_argv(argv: list[str]) -> list[str]:
  """The command line's flags less those --cores sets itself in each pinned process."""
  def own(arg):
    name = arg.lstrip("-").split("=")[0]
    return any(name in (flag, f"no{flag}") for flag in CORES_OWN_FLAGS)
  return [arg for arg in argv if not own(arg)]


def bench_cores(config):
  try:
    counts = sorted({int(k) for k in flags.FLAGS.cores})
    if counts[0] < 1:
      raise ValueError
  except ValueError:
    raise UserError(f"--cores={','.join(flags.FLAGS.cores)}: give core counts, e.g. 4,8,16."
                    ) from None
  rows = measure_cores(config, flags.FLAGS.shapes, counts, argv=child_argv(sys.argv[1:]),
                       with_brackets=flags.FLAGS.core_brackets, **_peer_rounds())
  if flags.FLAGS.json:
    print(json.dumps(rows))


def _peer_rounds() -> dict:
  """The flags of the rounds that set randygpt beside its PyTorch peers (--shapes, --cores)."""
  return dict(repeats=flags.FLAGS.shape_repeats, nanogpt_iters=flags.FLAGS.nanogpt_iters,
              script=flags.FLAGS.nanogpt_script)


def bench():
  config = randygpt_flags.run_config()
  if flags.FLAGS.text_sizes:
    try:
      sizes = [int(float(size)) for size in flags.FLAGS.text_sizes]
      if min(sizes) < 1:
        raise ValueError
    except (ValueError, OverflowError):
      raise UserError(f"--text_sizes={','.join(flags.FLAGS.text_sizes)}: give sizes in "
                      "bytes, e.g. 1e6,1e8.") from None
    rows = measure_text_sizes(config, sizes)
    print(json.dumps(rows) if flags.FLAGS.json else text_size_table(rows))
    return
  if flags.FLAGS.variants:
    rows = measure_variants(config, flags.FLAGS.variants, flags.FLAGS.steps,
                            flags.FLAGS.warmup_steps)
    if flags.FLAGS.json:
      print(json.dumps(rows))
    return
  if flags.FLAGS.core_runner:
    if len(flags.FLAGS.shapes) != 1:
      raise UserError("--core_runner times one shape: give one --shapes.")
    print(json.dumps(time_runner(config, flags.FLAGS.shapes[0], flags.FLAGS.core_runner,
                                 steps=flags.FLAGS.steps,
                                 warmup_steps=flags.FLAGS.warmup_steps)))
    return
  if flags.FLAGS.shapes:
    try:
      import torch  # noqa: F401
    except ImportError:
      raise UserError("--shapes needs PyTorch: pip install torch==2.13.0") from None
    if flags.FLAGS.nanogpt_iters:
      prepare_nanogpt(flags.FLAGS.nanogpt_script, flags.FLAGS.nanogpt_git)
    if flags.FLAGS.cores:
      bench_cores(config)
      return
    rows = measure_shapes(config, flags.FLAGS.shapes, steps=flags.FLAGS.steps,
                          warmup_steps=flags.FLAGS.warmup_steps,
                          loop_iters=flags.FLAGS.loop_iters, **_peer_rounds())
    if flags.FLAGS.json:
      print(json.dumps(rows))
    return
  result = measure(config, steps=flags.FLAGS.steps, warmup_steps=flags.FLAGS.warmup_steps,
                   saves=flags.FLAGS.saves, with_torch=flags.FLAGS.torch,
                   peak_gflops=flags.FLAGS.peak_gflops)
  if flags.FLAGS.run_iters:
    result |= measure_training_runs(config, flags.FLAGS.run_iters)
  if flags.FLAGS.json:
    print(json.dumps(result))
    return
  rows = table_rows(result)
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
  app.run(cli.entry_point(bench), flags_parser=cli.parse_flags)
