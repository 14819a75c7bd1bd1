"""Every command-line flag, its validation, and the RunConfig built from them."""

from absl import flags

from randygpt.config import ModelConfig, RunConfig, SampleConfig, TrainConfig

# Flags that say where a run lives rather than what it is: left out of flags.cfg.
RUN_LOCATION_FLAGS = frozenset({"workdir", "resume", "resume_from", "overwrite"})

_DATA = flags.DEFINE_string(
    "data", "train.txt", "Training text (any UTF-8 text, one token per character). When the "
    "default train.txt is absent, a small built-in sample is used. A missing file named like a "
    "known dataset (tinyshakespeare.txt) is downloaded and checked.")
_DATA_URL = flags.DEFINE_string(
    "data_url", "", "Where to download a known dataset from when --data is missing "
    "(default: its usual address). The SHA-256 is checked either way.")
_DATA_ENCODING = flags.DEFINE_string("data_encoding", "utf-8",
                                     "Text encoding of --data, e.g. latin-1.")
_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/default", "Directory for everything this run writes: flags.cfg, "
    "vocab.json, metrics.jsonl, summary.json, samples.txt.")

_N_EMBD = flags.DEFINE_integer("n_embd", 128, "Embedding width.", lower_bound=1)
_N_HEAD = flags.DEFINE_integer("n_head", 8, "Attention heads; must divide --n_embd.",
                               lower_bound=1)
_N_LAYER = flags.DEFINE_integer("n_layer", 6, "Transformer blocks.", lower_bound=1)
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 64, "Context length in characters.",
                                   lower_bound=1)
_DROPOUT = flags.DEFINE_float("dropout", 0.1, "Dropout rate on the attention and MLP outputs "
                              "during training.", lower_bound=0.0)

_ITERS = flags.DEFINE_integer("iters", 1000, "Target iteration: training stops when this "
                              "many steps are done (not an additional count).", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Sequences per training step.",
                                   lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate, reached "
                                    "after the warmup.", lower_bound=0.0)
_MIN_LR = flags.DEFINE_float("min_lr", 3e-4, "Learning rate at the end of the cosine decay "
                             "and after it.", lower_bound=0.0)
_WARMUP_ITERS = flags.DEFINE_integer("warmup_iters", 100, "Linear warmup length.",
                                     lower_bound=0)
_LR_DECAY_ITERS = flags.DEFINE_integer(
    "lr_decay_iters", 0, "Iteration at which the cosine decay reaches --min_lr; 0 means the "
    "--iters of the run's first start.", lower_bound=0)
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay, applied to the "
                                   "weight matrices, not to the embeddings.", lower_bound=0.0)
_BETA1 = flags.DEFINE_float("beta1", 0.9, "AdamW beta1.", lower_bound=0.0, upper_bound=1.0)
_BETA2 = flags.DEFINE_float("beta2", 0.99, "AdamW beta2.", lower_bound=0.0, upper_bound=1.0)
_GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Clip gradients to this global norm.",
                                lower_bound=0.0)
_EVAL_INTERVAL = flags.DEFINE_integer("eval_interval", 100, "Estimate train and val loss "
                                      "every this many iterations (and at the end).",
                                      lower_bound=1)
_EVAL_ITERS = flags.DEFINE_integer("eval_iters", 20, "Batches per loss estimate.",
                                   lower_bound=1)
_LOG_INTERVAL = flags.DEFINE_integer("log_interval", 10, "Log a line every this many "
                                     "iterations.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 1337, "Seed for initialisation, data windows, dropout "
                             "and sampling.")

_PROMPT = flags.DEFINE_multi_string("prompt", ["ROMEO:"], "Text to continue after training; "
                                    "repeat the flag for several samples.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Characters to generate per "
                                       "prompt (may exceed --block_size).", lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature, > 0.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling: keep the smallest set of "
                            "characters whose probability reaches this, in (0, 1].")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep only the k most likely characters; 0 is off.",
                              lower_bound=0)

flags.register_validator("dropout", lambda v: v < 1.0, "--dropout must be below 1.")
flags.register_validator("temperature", lambda v: v > 0.0, "--temperature must be > 0.")
flags.register_validator("top_p", lambda v: 0.0 < v <= 1.0, "--top_p must be in (0, 1].")
flags.register_validator("learning_rate", lambda v: v > 0.0, "--learning_rate must be > 0.")
flags.register_multi_flags_validator(
    ["n_embd", "n_head"], lambda f: f["n_embd"] % f["n_head"] == 0,
    "--n_embd must be divisible by --n_head.")
flags.register_multi_flags_validator(
    ["min_lr", "learning_rate"], lambda f: f["min_lr"] <= f["learning_rate"],
    "--min_lr must not exceed --learning_rate.")


def serialize() -> str:
  """This module's flags, in flag-file form, minus the run-location ones."""
  lines = [f.serialize() for f in flags.FLAGS.get_flags_for_module(__name__)
           if f.name not in RUN_LOCATION_FLAGS]
  return "\n".join(line for line in lines if line) + "\n"


def run_config() -> RunConfig:
  return RunConfig(
      model=ModelConfig(n_embd=_N_EMBD.value, n_head=_N_HEAD.value, n_layer=_N_LAYER.value,
                        block_size=_BLOCK_SIZE.value, dropout=_DROPOUT.value),
      train=TrainConfig(
          iters=_ITERS.value, batch_size=_BATCH_SIZE.value, learning_rate=_LEARNING_RATE.value,
          min_lr=_MIN_LR.value, warmup_iters=_WARMUP_ITERS.value,
          lr_decay_iters=_LR_DECAY_ITERS.value, weight_decay=_WEIGHT_DECAY.value,
          beta1=_BETA1.value, beta2=_BETA2.value, grad_clip=_GRAD_CLIP.value,
          eval_interval=_EVAL_INTERVAL.value, eval_iters=_EVAL_ITERS.value,
          log_interval=_LOG_INTERVAL.value, seed=_SEED.value),
      sample=SampleConfig(prompts=tuple(_PROMPT.value), max_new_tokens=_MAX_NEW_TOKENS.value,
                          temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                          top_k=_TOP_K.value),
      data=_DATA.value, data_url=_DATA_URL.value, data_encoding=_DATA_ENCODING.value,
      workdir=_WORKDIR.value, flags_cfg=serialize(),
  )
