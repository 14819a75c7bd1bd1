import dataclasses

import pytest

from randygpt.config import PLATFORMS, ModelConfig, RunConfig, TrainConfig, parse_duration
from randygpt.errors import UserError

SAVED = RunConfig(model=ModelConfig(n_embd=64, n_head=4), train=TrainConfig(
    iters=20, learning_rate=0.01, lr_decay_iters=40, seed=7)).to_flags()


def test_configs_are_hashable_for_jit():
  assert hash(ModelConfig(vocab_size=3)) == hash(ModelConfig(vocab_size=3))
  with pytest.raises(dataclasses.FrozenInstanceError):
    ModelConfig().n_embd = 3


def test_flags_round_trip():
  config = RunConfig.from_flags(SAVED)
  assert config.to_flags() == SAVED
  assert "workdir" not in SAVED and "vocab_size" not in SAVED


def test_resume_takes_the_checkpoints_flags_unless_given():
  now = RunConfig.from_flags({"iters": 40, "workdir": "w", "resume": True},
                             explicit={"iters", "workdir", "resume"})
  resumed = now.resumed(SAVED, "ckpt")
  assert resumed.train.iters == 40  # Given now.
  assert resumed.train.learning_rate == 0.01 and resumed.train.lr_decay_iters == 40
  assert resumed.model.n_embd == 64 and resumed.train.seed == 7
  assert resumed.location.workdir == "w" and resumed.location.resume


@pytest.mark.parametrize("given, expected", [({}, "gpu"), ({"train_platform": "cpu"}, "cpu")])
def test_a_resume_keeps_the_training_platform_unless_given(given, expected):
  """Like the device count: the platform is a location flag, but what the run trains on."""
  gpu_run = RunConfig.from_flags({**SAVED, "train_platform": "gpu"})
  assert gpu_run.recorded_flags()["train_platform"] == "gpu"
  assert "train_platform" not in RunConfig.from_flags(SAVED).recorded_flags()  # The CPU's.
  now = RunConfig.from_flags({"resume": True, **given}, explicit={"resume", *given})
  assert now.resumed(gpu_run.recorded_flags(), "ckpt").location.train_platform == expected
  # A run that recorded none trained on the CPU, whatever this command's default.
  assert RunConfig.from_flags({"train_platform": "auto"}).resumed(
      SAVED, "ckpt").location.train_platform == "cpu"


def test_resume_refuses_flags_that_contradict_the_shape_or_seed():
  now = RunConfig.from_flags({"n_embd": 128, "n_layer": 2, "seed": 7},
                             explicit={"n_embd", "n_layer", "seed"})
  with pytest.raises(UserError, match=r"n_embd=64 \(flag: 128\), n_layer=6 \(flag: 2\)"):
    now.resumed(SAVED, "ckpt")


def test_resume_accepts_flags_equal_to_the_checkpoint():
  now = RunConfig.from_flags(SAVED, explicit=set(SAVED))
  assert now.resumed(SAVED, "ckpt").to_flags() == SAVED


def test_resume_refuses_flags_that_contradict_the_levers_or_optimizer():
  saved = {**SAVED, "position": "rope", "qk_norm": True}
  now = RunConfig.from_flags({"position": "learned", "qk_norm": False, "optimizer": "muon"},
                             explicit={"position", "qk_norm", "optimizer"})
  with pytest.raises(UserError, match=r"position=rope \(flag: learned\), qk_norm=True \(flag: "
                     r"False\), optimizer=adamw \(flag: muon\)\. A resumed run keeps the "
                     r"checkpoint's shape, levers, optimizer, weight average, tokenizer and seed"):
    now.resumed(saved, "ckpt")


def test_the_weights_average_is_fixed_on_resume():
  """A checkpoint without an average (one from before --ema_decay too) cannot grow one, nor a
  checkpoint with one change its decay; not giving the flag keeps the checkpoint's."""
  older = {k: v for k, v in SAVED.items() if k != "ema_decay"}
  asked = RunConfig.from_flags({"ema_decay": 0.998}, explicit={"ema_decay"})
  with pytest.raises(UserError, match=r"ema_decay=0\.0 \(flag: 0\.998\)\. A resumed run keeps"):
    asked.resumed(older, "ckpt")
  averaged = {**SAVED, "ema_decay": 0.998}
  assert RunConfig.from_flags({}).resumed(averaged, "ckpt").train.ema_decay == 0.998
  with pytest.raises(UserError, match=r"ema_decay=0\.998 \(flag: 0\.9\)"):
    RunConfig.from_flags({"ema_decay": 0.9}, explicit={"ema_decay"}).resumed(averaged, "ckpt")


def test_a_checkpoint_from_before_the_levers_has_them_off():
  older = {k: v for k, v in SAVED.items()
           if k not in ("position", "qk_norm", "final_norm", "optimizer", "muon_rms",
                        "rolling_cache")}
  resumed = RunConfig.from_flags({}, explicit=set()).resumed(older, "ckpt")
  assert (resumed.model.position, resumed.model.qk_norm, resumed.model.final_norm,
          resumed.train.optimizer) == ("learned", False, False, "adamw")
  # Saying so explicitly is no contradiction; asking for a lever is.
  off = RunConfig.from_flags({"position": "learned", "final_norm": False},
                             explicit={"position", "final_norm"})
  assert off.resumed(older, "ckpt").model.position == "learned"
  on = RunConfig.from_flags({"final_norm": True}, explicit={"final_norm"})
  with pytest.raises(UserError, match=r"final_norm=False \(flag: True\)"):
    on.resumed(older, "ckpt")


def test_the_schedule_is_the_checkpoints_unless_given_and_cosine_before_it_existed():
  older = {k: v for k, v in SAVED.items() if k not in ("lr_schedule", "decay_fraction")}
  assert RunConfig().resumed(older, "ckpt").train.lr_schedule == "cosine"
  saved = {**SAVED, "lr_schedule": "wsd", "decay_fraction": 0.3}
  assert RunConfig().resumed(saved, "ckpt").train.decay_fraction == 0.3
  now = RunConfig.from_flags({"lr_schedule": "cosine"}, explicit={"lr_schedule"})
  assert now.resumed(saved, "ckpt").train.lr_schedule == "cosine"  # Not fixed on resume.


def test_replace_changes_fields_by_their_flat_names():
  config = RunConfig(explicit=frozenset({"iters"}))
  changed = config.replace(vocab_size=65, lr_decay_iters=1000, microbatches=4, workdir="w")
  assert (changed.model.vocab_size, changed.train.lr_decay_iters, changed.train.microbatches,
          changed.location.workdir) == (65, 1000, 4, "w")
  assert changed.sample == config.sample and changed.explicit == config.explicit
  assert changed.replace(vocab_size=0, lr_decay_iters=0, microbatches=0,
                         workdir="runs/default") == config
  with pytest.raises(TypeError, match="n_embed"):
    config.replace(n_embed=64)


def test_field_names_are_unique_across_sections():
  names = [f.name for section in dataclasses.fields(RunConfig) if section.name != "explicit"
           for f in dataclasses.fields(section.type)]
  assert len(names) == len(set(names))  # A flat name says which section's field it is.


def test_platform_choices_are_the_platforms_runtime_knows():
  from randygpt.runtime import platforms
  assert PLATFORMS == tuple(platforms.CHOICES)


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400), ("600", 600), (".5m", 30),
    ("0", None), ("0s", None), ("", None), ("10 m", None), ("10x", None), ("m", None),
    ("-5s", None)])
def test_parse_duration(text, seconds):
  assert parse_duration(text) == seconds
