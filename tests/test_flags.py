import dataclasses

import pytest
from absl import flags
from absl.testing import flagsaver

from randygpt import flags as randygpt_flags
from randygpt.config import RunConfig

FLAGS = flags.FLAGS


def parse(*args):
  FLAGS.unparse_flags()
  FLAGS(["randygpt", *args])
  return randygpt_flags.run_config()


@pytest.fixture(autouse=True)
def restore_flags():
  with flagsaver.flagsaver():
    yield
  FLAGS.unparse_flags()


@pytest.mark.parametrize("args, message", [
    (["--n_embd=100", "--n_head=8"], "divisible by --n_head"),
    (["--n_layer=0"], "n_layer"),
    (["--batch_size=-1"], "batch_size"),
    (["--top_p=0"], "top_p must be in"),
    (["--top_p=1.5"], "top_p must be in"),
    (["--temperature=-0.5"], "--temperature=-0.5"),
    (["--dropout=1.0"], "dropout must be below 1"),
    (["--ema_decay=1"], "ema_decay must be below 1"),
    (["--ema_decay=-0.5"], "ema_decay"),
    (["--learning_rate=0"], "learning_rate must be positive"),
    (["--muon_rms=0"], "muon_rms must be positive"),
    (["--min_lr=1", "--learning_rate=0.1"], "min_lr must not exceed"),
    (["--top_k=-3"], "top_k"),
    (["--decay_fraction=0"], "decay_fraction must be positive"),
    (["--decay_fraction=1.5"], "decay_fraction"),
    (["--lr_schedule=linear"], "lr_schedule"),
    (["--time_budget=10 min"], "time_budget must be a duration such as"),
    (["--time_budget=0s"], "time_budget must be a duration such as"),
])
def test_invalid_values_are_refused(args, message):
  with pytest.raises(flags.IllegalFlagValueError, match=message):
    parse(*args)


def test_a_time_budget_is_a_duration():
  assert parse("--time_budget=1h30m").location.time_budget == "1h30m"
  assert parse().location.time_budget == ""


def test_platform_flags_take_any_case_and_refuse_unknown_names():
  parse("--eval_platform=Metal", "--train_platform=AUTO")
  assert (FLAGS.eval_platform, FLAGS.train_platform) == ("metal", "auto")
  with pytest.raises(flags.IllegalFlagValueError, match="eval_platform"):
    parse("--eval_platform=vulkan")


def test_unknown_flag_is_refused():
  with pytest.raises(flags.UnrecognizedFlagError):
    parse("--n_embed=64")


def test_every_flag_has_help():
  for flag in FLAGS.get_flags_for_module(randygpt_flags.__name__):
    assert flag.help and len(flag.help) > 10, flag.name


def test_flags_cfg_repeats_the_run_without_its_location(tmp_path):
  config = parse("--n_embd=64", "--n_head=4", "--prompt=A", "--prompt=B C",
                 "--workdir=/somewhere", "--learning_rate=0.01")
  text = config.flagfile()
  assert "--workdir" not in text and "--resume" not in text
  assert "--n_embd=64" in text and "--prompt=B C" in text
  flagfile = tmp_path / "flags.cfg"
  flagfile.write_text(text)
  again = parse(f"--flagfile={flagfile}")
  assert again.location.workdir == "runs/default"
  assert again.to_flags() == config.to_flags()


def test_every_project_flag_is_a_config_field():
  config = parse()
  names = {f.name for f in FLAGS.get_flags_for_module(randygpt_flags.__name__)}
  assert names == set(config.to_flags(include_location=True))


def test_flags_and_config_fields_agree_on_names_defaults_and_types():
  # The flags are generated from the fields: this checks the generation.
  fields = {f.name: f for section in dataclasses.fields(RunConfig) if section.name != "explicit"
            for f in dataclasses.fields(section.type)}
  project = {f.name: f for f in FLAGS.get_flags_for_module(randygpt_flags.__name__)}
  assert set(fields) - set(project) == {"vocab_size"} and set(project) <= set(fields)
  for name, flag in project.items():
    default = tuple(flag.default) if isinstance(flag.default, list) else flag.default
    assert (default, type(default)) == (fields[name].default, type(fields[name].default)), name
    checks = fields[name].metadata
    assert checks["help"] in flag.help, name
    for key in ("lower_bound", "upper_bound"):
      assert getattr(flag.parser, key, None) == checks.get(key), (name, key)
    choices = getattr(flag.parser, "enum_values", None)
    assert (tuple(choices) if choices else None) == checks.get("choices"), name


def test_no_flags_give_the_default_config():
  assert parse() == RunConfig()


def test_explicit_flags_are_remembered(tmp_path):
  flagfile = tmp_path / "x.cfg"
  flagfile.write_text("--n_embd=64\n")
  assert parse(f"--flagfile={flagfile}", "--iters=3").explicit == {"n_embd", "iters"}


def test_command_line_overrides_flagfile(tmp_path):
  flagfile = tmp_path / "preset.cfg"
  flagfile.write_text("--n_embd=64\n--iters=5\n")
  config = parse(f"--flagfile={flagfile}", "--iters=7")
  assert (config.model.n_embd, config.train.iters) == (64, 7)


def test_presets_parse_and_have_the_documented_shapes():
  from conftest import REPO
  shapes = {}
  for name in ("tiny", "medium", "large", "shakespeare"):
    config = parse(f"--flagfile={REPO / 'experiments' / (name + '.cfg')}")
    shapes[name] = (config.model.n_embd, config.model.n_head, config.model.n_layer)
  assert shapes == {"tiny": (64, 4, 2), "medium": (256, 8, 6), "large": (512, 16, 12),
                    "shakespeare": (128, 8, 6)}


def test_the_fast_preset_keeps_the_shakespeare_width_depth_context_and_batch():
  from conftest import REPO
  base, fast = (parse(f"--flagfile={REPO / 'experiments' / name}")
                for name in ("shakespeare.cfg", "shakespeare_fast.cfg"))
  searched = {"position", "qk_norm", "final_norm", "optimizer", "n_head", "dropout",
              "lr_schedule", "decay_fraction", "eval_interval", "ema_decay"}
  for section in ("model", "train", "data", "sample"):
    differ = {k for k, v in getattr(fast, section).__dict__.items()
              if getattr(getattr(base, section), k) != v}
    assert differ <= searched, differ
  assert (fast.model.n_embd, fast.model.n_layer) == (base.model.n_embd, base.model.n_layer)
  assert (fast.model.block_size, fast.train.batch_size) == (64, 32)
