"""Every flag of training and sampling, its validation, and the RunConfig built from them.

Flag names are RunConfig field names (see config.py), so the parsed flags map onto the
config with no per-flag code.
"""

import math

from absl import flags

from randygpt.runtime import platforms
from randygpt.config import RunConfig

# Data and run location.
flags.DEFINE_string(
    "data", "train.txt", "Training text (any UTF-8 text, one token per character). When the "
    "default train.txt is absent, a small built-in sample is used. A missing file named like a "
    "known dataset (tinyshakespeare.txt) is downloaded and checked.")
flags.DEFINE_string(
    "data_url", "", "Where to download a known dataset from when --data is missing "
    "(default: its usual address). The SHA-256 is checked either way.")
flags.DEFINE_string("data_encoding", "utf-8", "Text encoding of --data, e.g. latin-1.")
flags.DEFINE_enum(
    "tokenizer", "chars", ["chars", "randygpt"], "`chars`: one token per distinct character, "
    "sorted. `randygpt`: randyGPT's vocabulary (`<` and `>` as BOS and EOS, ids 0 and 1, then "
    "the sorted characters of the text read line by line, each line ending in a newline), as "
    "python -m randygpt.import_bin sets it for imported checkpoints.")
flags.DEFINE_string(
    "workdir", "runs/default", "Directory for everything this run writes: flags.cfg, "
    "vocab.json, metrics.jsonl, summary.json, samples.txt, checkpoints/.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir (start "
                  "fresh, saying so, when there is none).")
flags.DEFINE_string("resume_from", "", "Continue from this checkpoint: a step directory, a "
                    "checkpoints directory, a workdir, or `latest` / `best` in --workdir.")
flags.DEFINE_bool("overwrite", False, "Allow starting over in a --workdir that holds "
                  "checkpoints, or resuming it from an older one (newer checkpoints are "
                  "deleted).")
flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into this many XLA devices and "
                     "train data-parallel across them (the batch must divide evenly); 0 picks "
                     "the largest count up to min(cores, 2) that divides --batch_size. Same "
                     "results on any count, up to float32 rounding. At most 256: XLA's CPU "
                     "collectives stalled with 2048 devices in one process.", lower_bound=0,
                     upper_bound=256)
flags.DEFINE_enum(
    "train_platform", "cpu", list(platforms.CHOICES), "Where training runs: the CPU devices "
    "(as in randyGPT); `auto` picks a CUDA/ROCm GPU or TPU when present (never Metal unless "
    "named). An unusable platform falls back to the CPU with a warning.", case_sensitive=False)
flags.DEFINE_enum(
    "eval_platform", "auto", list(platforms.CHOICES), "Where loss estimates and sampling run: "
    "`auto` picks the first working accelerator (gpu, tpu, metal, mps), else the CPU. An "
    "unusable platform falls back to the CPU with a warning.", case_sensitive=False)
flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for a multi-process run (with "
    "--num_processes and --process_id); `auto` lets jax.distributed.initialize() discover "
    "the cluster itself (SLURM, TPU pods). launch.sh --processes=N sets all three.")
flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.", lower_bound=1)
flags.DEFINE_integer("process_id", 0, "This process's rank, 0 to --num_processes - 1.",
                     lower_bound=0)
flags.DEFINE_integer("distributed_timeout", 60, "Seconds to wait for the other processes "
                     "at start-up, and for a missing one before giving up.", lower_bound=1)

# Model shape.
flags.DEFINE_integer("n_embd", 128, "Embedding width.", lower_bound=1)
flags.DEFINE_integer("n_head", 8, "Attention heads; must divide --n_embd.", lower_bound=1)
flags.DEFINE_integer("n_layer", 6, "Transformer blocks.", lower_bound=1)
flags.DEFINE_integer("block_size", 64, "Context length in characters.", lower_bound=1)
flags.DEFINE_float("dropout", 0.1, "Dropout rate on the attention and MLP outputs during "
                   "training.", lower_bound=0.0)
flags.DEFINE_enum(
    "position", "learned", ["learned", "rope"], "How the model knows positions: `learned` "
    "embeddings added to the input (randyGPT), or `rope`: rotary embeddings of each head's "
    "query and key, relative positions with no learned parameters (docs/levers.md).")
flags.DEFINE_bool("qk_norm", False, "Normalise each head's query and key (gain-free RMSNorm) "
                  "before their dot product (docs/levers.md).")
flags.DEFINE_bool("final_norm", False, "A gain-free RMSNorm of the last residual stream "
                  "before the lm_head (randyGPT has none; docs/levers.md).")

# Training.
flags.DEFINE_integer("iters", 1000, "Target iteration: training stops when this many steps "
                     "are done (not an additional count).", lower_bound=1)
flags.DEFINE_enum(
    "optimizer", "adamw", ["adamw", "muon"], "`adamw` for every weight, or `muon`: Muon "
    "(optax.contrib, optax 0.2.7 or newer) for each block's matrices (q, k and v as three), "
    "AdamW for the embeddings and the lm_head, one learning-rate schedule (docs/levers.md).")
flags.DEFINE_float("muon_rms", 0.2, "--optimizer=muon: the RMS of Muon's orthogonalised update "
                   "per unit of learning rate, so that --learning_rate suits both optimizers "
                   "(AdamW's update RMS is about 0.2).")
flags.DEFINE_integer("batch_size", 32, "Sequences per training step.", lower_bound=1)
flags.DEFINE_integer("microbatches", 0, "Slices of the batch that a training step runs one "
                     "after another, summing their gradients: the same step in less memory, "
                     "and on the CPU faster. Must divide --batch_size; 0 picks, on the CPU, "
                     "slices whose share on each device fits the caches (the header says "
                     "which), and 1 elsewhere.", lower_bound=0)
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate, reached after the warmup.")
flags.DEFINE_float("min_lr", 3e-4, "Learning rate at the end of the cosine decay and after "
                   "it.", lower_bound=0.0)
flags.DEFINE_integer("warmup_iters", 100, "Linear warmup length.", lower_bound=0)
flags.DEFINE_integer(
    "lr_decay_iters", 0, "Iteration at which the cosine decay reaches --min_lr; 0 means the "
    "--iters of the run's first start. Kept in checkpoints: a resumed run follows the same "
    "schedule unless this is given.", lower_bound=0)
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay, applied to the weight matrices, "
                   "not to the embeddings.", lower_bound=0.0)
flags.DEFINE_float("beta1", 0.9, "AdamW beta1.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("beta2", 0.99, "AdamW beta2.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("grad_clip", 1.0, "Clip gradients to this global norm; 0 is off.",
                   lower_bound=0.0)
flags.DEFINE_integer("eval_interval", 100, "Estimate train and val loss every this many "
                     "iterations (and at the end).", lower_bound=1)
flags.DEFINE_integer("eval_iters", 20, "Batches per loss estimate.", lower_bound=1)
flags.DEFINE_integer("log_interval", 10, "Log a line every this many iterations.",
                     lower_bound=1)
flags.DEFINE_integer("checkpoint_interval", 100, "Save the latest checkpoint every this many "
                     "iterations (and at the end, and on Ctrl-C).", lower_bound=1)
flags.DEFINE_integer("seed", 1337, "Seed for initialisation, data windows, dropout and "
                     "sampling.", lower_bound=-2**63, upper_bound=2**63 - 1)  # JAX's int64.

# Sampling.
flags.DEFINE_multi_string("prompt", ["ROMEO:"], "Text to continue; repeat the flag for "
                          "several samples.")
flags.DEFINE_integer("max_new_tokens", 200, "Characters to generate per prompt (may exceed "
                     "--block_size).", lower_bound=0)
flags.DEFINE_integer("num_samples", 1, "Samples per prompt, drawn as one batch.",
                     lower_bound=1)
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 always takes the most likely "
                   "character (greedy).", lower_bound=0.0)
flags.DEFINE_float("top_p", 0.9, "Nucleus sampling: keep the smallest set of characters whose "
                   "probability reaches this, in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely characters; 0 is off.",
                     lower_bound=0)
flags.DEFINE_bool(
    "rolling_cache", False, "With --position=rope, sample past --block_size with a rolling "
    "key/value cache (one position per character) instead of re-running the window for each "
    "one; each character then keeps the context it had when it was computed (docs/levers.md).")

flags.register_validator("dropout", lambda v: v < 1.0, "--dropout must be below 1.")
for _beta in ("beta1", "beta2"):  # At 1, Adam's bias correction divides by zero.
  flags.register_validator(_beta, lambda v: v < 1.0, f"--{_beta} must be below 1.")
flags.register_validator("top_p", lambda v: 0.0 < v <= 1.0, "--top_p must be in (0, 1].")
for _rate in ("learning_rate", "muon_rms"):  # 0 would train nothing.
  flags.register_validator(_rate, lambda v: v > 0.0, f"--{_rate} must be positive.")
flags.register_multi_flags_validator(
    ["n_embd", "n_head"], lambda f: f["n_embd"] % f["n_head"] == 0,
    "--n_embd must be divisible by --n_head.")
for _flag in flags.FLAGS.get_flags_for_module(__name__):
  if isinstance(_flag.value, float):  # Bounds let nan and inf through.
    flags.register_validator(_flag.name, math.isfinite, f"--{_flag.name} must be a finite "
                             "number.")
flags.register_multi_flags_validator(
    ["num_cpu_devices", "batch_size"],
    lambda f: f["num_cpu_devices"] <= f["batch_size"],  # Checked before XLA makes them.
    "--num_cpu_devices must not exceed --batch_size: each device trains part of the batch.")
flags.register_multi_flags_validator(
    ["batch_size", "microbatches"], lambda f: f["batch_size"] % max(f["microbatches"], 1) == 0,
    "--microbatches must divide --batch_size.")
flags.register_multi_flags_validator(
    ["process_id", "num_processes"], lambda f: f["process_id"] < f["num_processes"],
    "--process_id must be below --num_processes.")
flags.register_multi_flags_validator(
    ["min_lr", "learning_rate"], lambda f: f["min_lr"] <= f["learning_rate"],
    "--min_lr must not exceed --learning_rate.")


def run_config() -> RunConfig:
  """The RunConfig of the parsed flags, remembering which the user set."""
  project_flags = flags.FLAGS.get_flags_for_module(__name__)
  values = {f.name: tuple(f.value) if isinstance(f.value, list) else f.value
            for f in project_flags}
  return RunConfig.from_flags(values, explicit={f.name for f in project_flags if f.present})
