"""Frozen configuration dataclasses: hashable, so jit can treat them as static."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 0  # Set from the data's vocabulary.
  n_embd: int = 128
  n_head: int = 8
  n_layer: int = 6
  block_size: int = 64
  dropout: float = 0.1

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  iters: int = 1000
  batch_size: int = 32
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
  seed: int = 1337


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  prompts: tuple[str, ...] = ("ROMEO:",)
  max_new_tokens: int = 200
  temperature: float = 0.8
  top_p: float = 0.9
  top_k: int = 0  # 0: off.


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one run needs; built from flags by `flags.run_config()`."""
  model: ModelConfig
  train: TrainConfig
  sample: SampleConfig
  data: str = "train.txt"
  data_url: str = ""
  data_encoding: str = "utf-8"
  workdir: str = "runs/default"
  flags_cfg: str = ""  # The project's flags as a flag file, written to <workdir>/flags.cfg.
