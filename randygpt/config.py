"""Frozen configuration dataclasses: hashable, so jit can treat them as static.

Each setting is written here once: its default, and as field metadata its --help text and
the checks its flag makes (bounds, choices). flags.py defines one absl flag per field from
them. Field names are the flag names, so a run's configuration is also a flat {flag: value}
dict (`to_flags` / `from_flags`): what flags.cfg holds and what a checkpoint stores.
"""

import dataclasses
import re

from randygpt.errors import UserError

# --train_platform / --eval_platform values; runtime/platforms.py maps each to a JAX platform.
PLATFORMS = ("auto", "cpu", "gpu", "cuda", "rocm", "tpu", "metal", "mps")


def flag(default, help_text: str, **checks):
  """A field that is also a flag. `checks` are absl's: lower_bound, upper_bound, choices (an
  enum flag) and case_sensitive. A tuple field is a flag given once per value."""
  return dataclasses.field(default=default, metadata={"help": help_text, **checks})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 0  # Set from the data's vocabulary, not a flag.
  n_embd: int = flag(128, "Embedding width.", lower_bound=1)
  n_head: int = flag(8, "Attention heads; must divide --n_embd.", lower_bound=1)
  n_layer: int = flag(6, "Transformer blocks.", lower_bound=1)
  block_size: int = flag(64, "Context length in characters.", lower_bound=1)
  dropout: float = flag(0.1, "Dropout rate on the attention and MLP outputs during training.",
                        lower_bound=0.0)
  # The levers (docs/levers.md); off by default, which is randyGPT's architecture.
  position: str = flag(
      "learned", "How the model knows positions: `learned` embeddings added to the input "
      "(randyGPT), or `rope`: rotary embeddings of each head's query and key, relative "
      "positions with no learned parameters (docs/levers.md).", choices=("learned", "rope"))
  qk_norm: bool = flag(False, "Normalise each head's query and key (gain-free RMSNorm) before "
                       "their dot product (docs/levers.md).")
  final_norm: bool = flag(False, "A gain-free RMSNorm of the last residual stream before the "
                          "lm_head (randyGPT has none; docs/levers.md).")
  logit_softcap: float = flag(0.0, "Bound the logits smoothly to (-cap, cap): cap·tanh(logits / "
                              "cap), as the modded-nanogpt speedrun does; 0 is off "
                              "(docs/levers.md).", lower_bound=0.0)
  zero_init: bool = flag(False, "Start the blocks' output projections (attention's wo, the "
                         "MLP's w2) and the lm_head at zero, as the modded-nanogpt speedrun "
                         "does (docs/levers.md).")
  # How the step computes, not what: the parameters and optimizer state stay float32.
  compute_dtype: str = flag(
      "auto", "The matmuls' dtype: `float32`, or `bfloat16` with float32 parameters, "
      "optimizer state, norms, softmaxes and loss. `auto`: bfloat16 where training runs on a "
      "GPU or TPU, float32 on the CPU. A run records its choice and a resume keeps it "
      "(docs/accelerators.md).", choices=("auto", "float32", "bfloat16"))
  attention: str = flag(
      "auto", "How attention is computed in training and loss estimates: `einsum` (scores, "
      "mask, softmax, weighted sum, as written in model.py), `xla` or `cudnn`: "
      "jax.nn.dot_product_attention's implementations (cuDNN's fused kernel: an NVIDIA GPU, "
      "bfloat16, head_dim a multiple of 8). `auto`: cudnn where it can run, else einsum. "
      "Recorded and kept on resume; a recorded cudnn runs as xla off the GPU.",
      choices=("auto", "einsum", "xla", "cudnn"))

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  iters: int = flag(1000, "Target iteration: training stops when this many steps are done "
                    "(not an additional count).", lower_bound=1)
  optimizer: str = flag(
      "adamw", "`adamw` for every weight, or `muon`: Muon (optax.contrib, optax 0.2.7 or "
      "newer) for each block's matrices (q, k and v as three), AdamW for the embeddings and "
      "the lm_head, one learning-rate schedule (docs/levers.md).", choices=("adamw", "muon"))
  muon_rms: float = flag(0.2, "--optimizer=muon: the RMS of Muon's orthogonalised update per "
                         "unit of learning rate, so that --learning_rate suits both optimizers "
                         "(AdamW's update RMS is about 0.2).")
  batch_size: int = flag(32, "Sequences per training step.", lower_bound=1)
  microbatches: int = flag(
      0, "Slices of the batch that a training step runs one after another, summing their "
      "gradients: the same step in less memory, and on the CPU faster. Must divide "
      "--batch_size; 0 picks, on the CPU, slices whose share on each device fits the caches "
      "(the header says which), and 1 elsewhere.", lower_bound=0)
  learning_rate: float = flag(3e-3, "Peak learning rate, reached after the warmup.")
  min_lr: float = flag(3e-4, "Learning rate at the end of the decay and after it.",
                       lower_bound=0.0)
  warmup_iters: int = flag(100, "Linear warmup length.", lower_bound=0)
  lr_decay_iters: int = flag(
      0, "Iteration at which the decay (--lr_schedule) reaches --min_lr; 0 means the --iters "
      "of the run's first start. Kept in checkpoints: a resumed run follows the same schedule "
      "unless this is given.", lower_bound=0)
  lr_schedule: str = flag(
      "cosine", "After the warmup: `cosine` down to --min_lr at the horizon "
      "(--lr_decay_iters), or `wsd` (warmup-stable-decay): --learning_rate held, then a "
      "linear decay to --min_lr over the horizon's last --decay_fraction (docs/levers.md). "
      "Kept in checkpoints unless given.", choices=("cosine", "wsd"))
  decay_fraction: float = flag(0.2, "--lr_schedule=wsd: the share of the horizon that the "
                               "decay takes, in (0, 1].", lower_bound=0.0, upper_bound=1.0)
  ema_decay: float = flag(
      0.0, "Keep an exponential moving average of the weights, updated after every step with "
      "this decay (warmed up as min(decay, (1 + t) / (10 + t)) at update t), and evaluate, "
      "keep as best and sample it instead of the weights; 0 is off. Fixed at the first start "
      "(docs/levers.md).", lower_bound=0.0)
  weight_decay: float = flag(0.1, "AdamW weight decay, applied to the weight matrices, not to "
                             "the embeddings.", lower_bound=0.0)
  beta1: float = flag(0.9, "AdamW beta1.", lower_bound=0.0, upper_bound=1.0)
  beta2: float = flag(0.99, "AdamW beta2.", lower_bound=0.0, upper_bound=1.0)
  grad_clip: float = flag(1.0, "Clip gradients to this global norm; 0 is off.", lower_bound=0.0)
  eval_interval: int = flag(100, "Estimate train and val loss every this many iterations (and "
                            "at the end).", lower_bound=1)
  eval_iters: int = flag(20, "Batches per loss estimate.", lower_bound=1)
  log_interval: int = flag(10, "Log a line every this many iterations.", lower_bound=1)
  checkpoint_interval: int = flag(100, "Save the latest checkpoint every this many iterations "
                                  "(and at the end, and on Ctrl-C).", lower_bound=1)
  seed: int = flag(1337, "Seed for initialisation, data windows, dropout and sampling.",
                   lower_bound=-2**63, upper_bound=2**63 - 1)  # JAX's int64.


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  prompt: tuple[str, ...] = flag(("ROMEO:",), "Text to continue; repeat the flag for several "
                                 "samples.")
  max_new_tokens: int = flag(200, "Characters to generate per prompt (may exceed "
                             "--block_size).", lower_bound=0)
  num_samples: int = flag(1, "Samples per prompt, drawn as one batch.", lower_bound=1)
  temperature: float = flag(0.8, "Sampling temperature; 0 always takes the most likely "
                            "character (greedy).", lower_bound=0.0)
  top_p: float = flag(0.9, "Nucleus sampling: keep the smallest set of characters whose "
                      "probability reaches this, in (0, 1].")
  top_k: int = flag(0, "Keep only the k most likely characters; 0 is off.", lower_bound=0)
  rolling_cache: bool = flag(
      False, "With --position=rope, sample past --block_size with a rolling key/value cache "
      "(one position per character) instead of re-running the window for each one; each "
      "character then keeps the context it had when it was computed (docs/levers.md).")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  data: str = flag(
      "train.txt", "Training text (any UTF-8 text, one token per character). When the default "
      "train.txt is absent, a small built-in sample is used. A missing file named like a known "
      "dataset (tinyshakespeare.txt) is downloaded and checked.")
  data_url: str = flag("", "Where to download a known dataset from when --data is missing "
                       "(default: its usual address). The SHA-256 is checked either way.")
  data_encoding: str = flag("utf-8", "Text encoding of --data, e.g. latin-1.")
  tokenizer: str = flag(
      "chars", "`chars`: one token per distinct character, sorted. `randygpt`: randyGPT's "
      "vocabulary (`<` and `>` as BOS and EOS, ids 0 and 1, then the sorted characters of the "
      "text read line by line, each line ending in a newline), as python -m "
      "randygpt.import_bin sets it for imported checkpoints. `bpe`: byte-pair tokens "
      "(--bpe_vocab_size of them) learnt from the training split, for big texts; compare runs "
      "of different tokenizers by bits per character (docs/data.md). `randygpt-bpe`: "
      "randyGPT's byte-pair tokens of --bpe_vocab, as randyGPT encodes the text "
      "(docs/import.md).", choices=("chars", "randygpt", "bpe", "randygpt-bpe"))
  bpe_vocab_size: int = flag(
      512, "--tokenizer=bpe: the tokens of the byte-pair vocabulary, the text's characters "
      "among them (at least as many as the text has distinct characters).", lower_bound=1)
  bpe_vocab: str = flag(
      "", "--tokenizer=randygpt-bpe: the vocab.json randyGPT wrote with --bpe (its tokens and "
      "merges); python -m randygpt.import_bin records it for imported BPE checkpoints.")


@dataclasses.dataclass(frozen=True)
class LocationConfig:
  """Where a run lives, how it starts and on what it runs: not part of what the run is."""
  workdir: str = flag("runs/default", "Directory for everything this run writes: flags.cfg, "
                      "vocab.json, metrics.jsonl, summary.json, samples.txt, checkpoints/.")
  resume: bool = flag(False, "Continue from the latest checkpoint in --workdir (start fresh, "
                      "saying so, when there is none).")
  resume_from: str = flag("", "Continue from this checkpoint: a step directory, a checkpoints "
                          "directory, a workdir, or `latest` / `best` in --workdir.")
  overwrite: bool = flag(False, "Allow starting over in a --workdir that holds checkpoints, or "
                         "resuming it from an older one (newer checkpoints are deleted).")
  train_platform: str = flag(
      "cpu", "Where training runs: the CPU devices (as in randyGPT); `auto` picks a CUDA/ROCm "
      "GPU or TPU when present (never Metal unless named). An unusable platform falls back to "
      "the CPU with a warning.", choices=PLATFORMS, case_sensitive=False)
  eval_platform: str = flag(
      "auto", "Where loss estimates and sampling run: `auto` picks the first working "
      "accelerator (gpu, tpu, metal, mps), else the CPU. An unusable platform falls back to "
      "the CPU with a warning.", choices=PLATFORMS, case_sensitive=False)
  num_cpu_devices: int = flag(
      0, "Split the CPU into this many XLA devices and train data-parallel across them (the "
      "batch must divide evenly); 0 picks one per usable core (its affinity and cgroup quota; "
      "hyperthreads of a core count once) while each keeps 256 tokens of the batch, at least "
      "2, dividing --batch_size. Same results on any count, up to float32 rounding. At most "
      "256: XLA's CPU collectives stalled with 2048 devices in one process.", lower_bound=0,
      upper_bound=256)
  coordinator_address: str = flag(
      "", "host:port of process 0 for a multi-process run (with --num_processes and "
      "--process_id); `auto` lets jax.distributed.initialize() discover the cluster itself "
      "(SLURM, TPU pods). launch.sh --processes=N sets all three.")
  num_processes: int = flag(1, "Processes in a multi-process run.", lower_bound=1)
  process_id: int = flag(0, "This process's rank, 0 to --num_processes - 1.", lower_bound=0)
  time_budget: str = flag(
      "", "Train for about this long (e.g. 90s, 10m, 1h30m) instead of --iters: a fresh start "
      "times a few steps and one evaluation after compiling, then trains the iterations that "
      "fit, evaluations and saves included (the header says how many; with "
      "--lr_schedule=wsd a first estimate, fixed when the decay starts from the loop's pace). "
      "flags.cfg records them as --iters, so a repeat from it trains as many without timing; "
      "a resume keeps them (docs/runs.md).")
  distributed_timeout: int = flag(60, "Seconds to wait for the other processes at start-up, "
                                  "and for a missing one before giving up.", lower_bound=1)


_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "sample": SampleConfig,
             "data": DataConfig, "location": LocationConfig}
NOT_FLAGS = frozenset(f.name for section in _SECTIONS.values()
                      for f in dataclasses.fields(section) if "help" not in f.metadata)


def flag_fields() -> list[dataclasses.Field]:
  """Every field that is a flag, section by section (flags.py defines them in this order)."""
  return [f for section in _SECTIONS.values() for f in dataclasses.fields(section)
          if f.name not in NOT_FLAGS]


# What a resumed run takes from its checkpoint whatever the flags say: the parameter tree's
# shape, the function it computes, the optimizer state's kind, the weights' average, and the
# seed.
FIXED_ON_RESUME = ("n_embd", "n_head", "n_layer", "block_size", "position", "qk_norm",
                   "final_norm", "logit_softcap", "zero_init", "optimizer", "ema_decay", "seed",
                   "tokenizer", "bpe_vocab_size")
# The location flags a run records and a resume keeps unless given again (--num_cpu_devices
# too, but before JAX starts: runtime/cli.py).
KEPT_LOCATION = ("train_platform",)
# What a checkpoint written before a flag existed ran with: the flag's default.
_DEFAULTS = {f.name: f.default for section in (ModelConfig, TrainConfig, DataConfig)
             for f in dataclasses.fields(section)}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  sample: SampleConfig = SampleConfig()
  data: DataConfig = DataConfig()
  location: LocationConfig = LocationConfig()
  explicit: frozenset[str] = frozenset()  # Flags the user set, on the command line or in a file.

  def to_flags(self, include_location: bool = False) -> dict:
    """The run's flag values by name (the location flags only when asked)."""
    values = {}
    for name in _SECTIONS:
      if name != "location" or include_location:
        values |= dataclasses.asdict(getattr(self, name))
    return {k: v for k, v in values.items() if k not in NOT_FLAGS}

  @classmethod
  def from_flags(cls, values: dict, explicit=frozenset()) -> "RunConfig":
    """Unknown names are ignored, missing ones take the defaults."""
    sections = {}
    for name, section in _SECTIONS.items():
      names = {f.name for f in dataclasses.fields(section)} - NOT_FLAGS
      sections[name] = section(**{k: v for k, v in values.items() if k in names})
    return cls(**sections, explicit=frozenset(explicit))

  def replace(self, **values) -> "RunConfig":
    """This config with fields replaced by their names, in whichever section holds them:
    `config.replace(vocab_size=65, microbatches=4)`."""
    unknown = set(values) - {f.name for s in _SECTIONS.values() for f in dataclasses.fields(s)}
    if unknown:
      raise TypeError(f"RunConfig has no fields {sorted(unknown)}")
    sections = {}
    for name, section in _SECTIONS.items():
      mine = {k: v for k, v in values.items() if k in section.__dataclass_fields__}
      sections[name] = dataclasses.replace(getattr(self, name), **mine)
    return dataclasses.replace(self, **sections)

  def recorded_flags(self) -> dict:
    """What flags.cfg and a checkpoint record: the run's flags, the CPU device count when set
    (a location flag, but the one that changes a step's float32 sums) and the training
    platform when it is not the CPU (what a resume trains on)."""
    values = self.to_flags()
    if self.location.num_cpu_devices:
      values["num_cpu_devices"] = self.location.num_cpu_devices
    if self.location.train_platform != "cpu":
      values["train_platform"] = self.location.train_platform
    return values

  def flagfile(self) -> str:
    """The run's flags in flag-file form: `--flagfile` of it repeats the run elsewhere."""
    lines = []
    for name, value in self.recorded_flags().items():
      for item in (value if isinstance(value, (tuple, list)) else (value,)):
        lines.append(f"--{name}={item}")
    return "\n".join(lines) + "\n"

  def resumed(self, saved: dict, checkpoint: str) -> "RunConfig":
    """The checkpoint's flags, overridden by those the user set now. The model shape
    and seed cannot be overridden: explicit flags that contradict them are refused."""
    current = self.to_flags(include_location=True)
    saved = {**{name: _DEFAULTS[name] for name in FIXED_ON_RESUME}, **saved}
    clashes = [f"{name}={saved[name]} (flag: {current[name]})" for name in FIXED_ON_RESUME
               if name in self.explicit and saved[name] != current[name]]
    if clashes:
      raise UserError(f"Checkpoint {checkpoint} has {', '.join(clashes)}. A resumed run keeps "
                      "the checkpoint's shape, levers, optimizer, weight average, tokenizer "
                      "and seed: drop those flags, or start a new run in another --workdir.")
    merged = {**saved, **{k: v for k, v in current.items() if k in self.explicit or (
        k in LocationConfig.__dataclass_fields__ and k not in KEPT_LOCATION)}}
    merged["prompt"] = tuple(merged["prompt"])
    return RunConfig.from_flags(merged, self.explicit)


_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)([hms]))+|\d+(?:\.\d*)?")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration(text: str) -> float | None:
  """Seconds in `90s`, `10m`, `1.5h`, `1h30m` or a bare `600` (seconds); None when `text`
  is not such a duration, or is zero."""
  text = text.strip()
  if not _DURATION.fullmatch(text):
    return None
  seconds = sum(float(number) * _UNIT_S[unit] for number, unit in
                re.findall(r"(\d+(?:\.\d*)?|\.\d+)([hms]?)", text))
  return seconds if seconds > 0 else None
