"""Frozen configuration dataclasses: hashable, so jit can treat them as static.

Field names are the flag names, so a run's configuration is also a flat {flag: value}
dict (`to_flags` / `from_flags`): what flags.cfg holds and what a checkpoint stores.
"""

import dataclasses

from randygpt.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 0  # Set from the data's vocabulary, not a flag.
  n_embd: int = 128
  n_head: int = 8
  n_layer: int = 6
  block_size: int = 64
  dropout: float = 0.1
  # The levers (docs/levers.md); off by default, which is randyGPT's architecture.
  position: str = "learned"  # "rope": rotary q and k, no learned position embedding.
  qk_norm: bool = False  # Gain-free RMSNorm of each head's query and key.
  final_norm: bool = False  # Gain-free RMSNorm before the lm_head.

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  iters: int = 1000
  optimizer: str = "adamw"  # "muon": Muon for the blocks' matrices, AdamW for the rest.
  muon_rms: float = 0.2  # Muon's update RMS relative to the learning rate (AdamW's is ~0.2).
  batch_size: int = 32
  microbatches: int = 0  # 0: decided from the shape and the platform.
  learning_rate: float = 3e-3
  min_lr: float = 3e-4
  warmup_iters: int = 100
  lr_decay_iters: int = 0  # 0: the decay horizon is `iters` of the run's first start.
  weight_decay: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.99
  grad_clip: float = 1.0
  eval_interval: int = 100
  eval_iters: int = 20
  log_interval: int = 10
  checkpoint_interval: int = 100
  seed: int = 1337


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  prompt: tuple[str, ...] = ("ROMEO:",)
  max_new_tokens: int = 200
  num_samples: int = 1
  temperature: float = 0.8  # 0: greedy.
  top_p: float = 0.9
  top_k: int = 0  # 0: off.
  rolling_cache: bool = False  # --position=rope: past the window, a rolling key/value cache.


@dataclasses.dataclass(frozen=True)
class DataConfig:
  data: str = "train.txt"
  data_url: str = ""
  data_encoding: str = "utf-8"
  tokenizer: str = "chars"  # "randygpt": randyGPT's vocabulary and line reading (import_bin).


@dataclasses.dataclass(frozen=True)
class LocationConfig:
  """Where a run lives, how it starts and on what it runs: not part of what the run is."""
  workdir: str = "runs/default"
  resume: bool = False
  resume_from: str = ""
  overwrite: bool = False
  train_platform: str = "cpu"
  eval_platform: str = "auto"
  num_cpu_devices: int = 0  # 0: decided from the cores and the batch size.
  coordinator_address: str = ""
  num_processes: int = 1
  process_id: int = 0
  distributed_timeout: int = 60


# What a resumed run takes from its checkpoint whatever the flags say: the parameter tree's
# shape, the function it computes, the optimizer state's kind, and the seed.
FIXED_ON_RESUME = ("n_embd", "n_head", "n_layer", "block_size", "position", "qk_norm",
                   "final_norm", "optimizer", "seed")
# What a checkpoint written before a flag existed ran with: the flag's default.
_DEFAULTS = {f.name: f.default for section in (ModelConfig, TrainConfig)
             for f in dataclasses.fields(section)}

_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "sample": SampleConfig,
             "data": DataConfig, "location": LocationConfig}
NOT_FLAGS = frozenset({"vocab_size"})


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
    """What flags.cfg and a checkpoint record: the run's flags, and the CPU device count when
    set (a location flag, but the one that changes a step's float32 sums)."""
    values = self.to_flags()
    if self.location.num_cpu_devices:
      values["num_cpu_devices"] = self.location.num_cpu_devices
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
                      "the checkpoint's shape, levers, optimizer and seed: drop those flags, "
                      "or start a new run in another --workdir.")
    merged = {**saved, **{k: v for k, v in current.items()
                          if k in self.explicit or k in LocationConfig.__dataclass_fields__}}
    merged["prompt"] = tuple(merged["prompt"])
    return RunConfig.from_flags(merged, self.explicit)
