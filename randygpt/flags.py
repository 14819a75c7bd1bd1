"""Every flag of training and sampling, its validation, and the RunConfig built from them.

The flags are made from RunConfig's fields (config.py holds each default, help text and
bound), so flag names are field names and the parsed flags map onto the config with no
per-flag code. The validators here check relations that a single field's bounds cannot.
"""

import dataclasses
import math

from absl import flags

from randygpt import config
from randygpt.config import RunConfig

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def _define(field: dataclasses.Field) -> None:
  """The absl flag of a config field: its kind from the field's type (an enum when it has
  choices), its default, help and bounds from the field."""
  checks = dict(field.metadata)
  help_text = checks.pop("help")
  if "choices" in checks:
    flags.DEFINE_enum(field.name, field.default, list(checks.pop("choices")), help_text,
                      **checks)
  elif field.type == tuple[str, ...]:  # Given once per value: --prompt=A --prompt=B.
    flags.DEFINE_multi_string(field.name, list(field.default), help_text, **checks)
  else:
    _DEFINE[field.type](field.name, field.default, help_text, **checks)


for _field in config.flag_fields():
  _define(_field)

flags.register_validator("dropout", lambda v: v < 1.0, "--dropout must be below 1.")
flags.register_validator("ema_decay", lambda v: v < 1.0,  # At 1 the average never moves.
                         "--ema_decay must be below 1.")
for _beta in ("beta1", "beta2"):  # At 1, Adam's bias correction divides by zero.
  flags.register_validator(_beta, lambda v: v < 1.0, f"--{_beta} must be below 1.")
flags.register_validator("top_p", lambda v: 0.0 < v <= 1.0, "--top_p must be in (0, 1].")
for _rate in ("learning_rate", "muon_rms", "decay_fraction"):  # 0: no training, no decay.
  flags.register_validator(_rate, lambda v: v > 0.0, f"--{_rate} must be positive.")
flags.register_validator("time_budget",
                         lambda v: not v or config.parse_duration(v) is not None,
                         "--time_budget must be a duration such as 90s, 10m or 1h30m.")
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
