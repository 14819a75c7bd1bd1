"""The memory check: what it counts, and a run that cannot fit refused before it allocates."""

import dataclasses

import jax

from randygpt import model
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt.runtime import footprint

from conftest import raises_user_error, run_training, tiny, write_corpus

MODEL = ModelConfig(vocab_size=65, n_embd=128, n_head=4, n_layer=4, block_size=64)
TRAIN = TrainConfig(batch_size=32, eval_iters=20)
SAMPLE = SampleConfig()


def total(**kw) -> int:
  return sum(footprint.estimate(kw.pop("mc", MODEL), SAMPLE, kw.pop("tc", TRAIN), **kw).values())


def test_the_state_is_counted_on_every_training_device():
  one, two = total(devices=1), total(devices=2)
  state = footprint.FLOAT_BYTES * footprint.STATE_COPIES * model.n_params(MODEL)
  assert two - one >= state  # A second copy of the state (activations are split).


def test_the_weights_average_is_one_more_copy_on_every_training_device():
  averaged = dataclasses.replace(TRAIN, ema_decay=0.998)
  weights = footprint.FLOAT_BYTES * model.n_params(MODEL)
  assert total(tc=averaged, devices=2) - total(devices=2) == 2 * weights
  assert total(tc=averaged, on_cpu=False) - total(on_cpu=False) == weights


def test_microbatches_and_the_eval_chunk_shrink_the_activations():
  assert total(microbatches=4) < total(microbatches=1)
  assert total(eval_chunk_tokens=512) < total(eval_chunk_tokens=8192)


def test_the_baseline_is_added_as_measured():
  assert total(baseline_bytes=300 << 20) - total() == 300 << 20


def test_a_run_past_physical_memory_is_refused_naming_the_largest_part(monkeypatch):
  big = ModelConfig(vocab_size=65, n_embd=1024, n_head=8, n_layer=24, block_size=64)
  monkeypatch.setattr(footprint, "physical_memory", lambda: 2 << 30)
  with raises_user_error("of physical memory; most of it for --n_embd, --n_layer."):
    footprint.check(big, SAMPLE, TRAIN, train_devices=jax.devices()[:1])
  footprint.check(MODEL, SAMPLE, TRAIN, train_devices=jax.devices()[:1])  # Well under 2 GiB.


def test_a_run_that_cannot_fit_is_refused_before_it_trains(tmp_path):
  with raises_user_error("This run needs about"):
    run_training(tmp_path / "w", **tiny(data=write_corpus(tmp_path / "c.txt"),
                                        n_embd=32768, n_head=8, n_layer=48))
  assert not (tmp_path / "w" / "checkpoints").exists()
