"""Where training, evaluation and sampling run, and the fallback to the CPU."""

import jax
import numpy as np
import pytest

from randygpt import evaluate
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt import sharding
from randygpt.runtime import platforms

import conftest
from conftest import (as_args, needs_gpu, read_metrics, run_training, tiny, without_accelerator,
                      write_corpus)

RUN = tiny(eval_interval=10, iters=10, eval_platform="auto")


@without_accelerator
def test_without_an_accelerator_everything_runs_on_the_cpu():
  placement = platforms.place("cpu", "auto")
  assert {d.platform for d in placement.train_devices} == {"cpu"}
  assert placement.eval_device.platform == "cpu"
  assert placement.notes == ("⚠ No accelerator found: evaluating on CPU",)


@without_accelerator
def test_a_requested_platform_that_is_absent_warns_and_uses_the_cpu():
  placement = platforms.place("metal", "gpu")
  assert placement.eval_device.platform == "cpu"
  assert {d.platform for d in placement.train_devices} == {"cpu"}
  assert len(placement.notes) == 2
  assert placement.notes[0].startswith("⚠ --train_platform=metal: Metal GPU not usable (")
  assert placement.notes[0].endswith("); training on CPU")
  assert placement.notes[1].startswith("⚠ --eval_platform=gpu: GPU not usable (")


def test_an_installed_accelerator_that_fails_is_skipped_with_its_reason():
  notes = []
  chosen = platforms._choose("eval_platform", "auto", ("METAL",), "evaluation",
                             {"METAL": "UNIMPLEMENTED: default_memory_space"}, notes)
  assert chosen == "cpu"
  assert notes == ["⚠ Metal GPU backend `METAL` failed (UNIMPLEMENTED: default_memory_space);"
                   " evaluating on CPU"]


def test_training_takes_the_first_cpu_devices_asked_for():
  assert len(jax.devices("cpu")) == 2  # This process's (conftest).
  assert platforms.place("cpu", "cpu").train_devices == tuple(jax.devices("cpu"))
  one = platforms.place("cpu", "cpu", num_cpu_devices=1)
  assert one.train_devices == (jax.devices("cpu")[0],)
  assert one.default_device == jax.devices("cpu")[0]


def test_eval_copies_replicated_params_to_the_eval_device():
  placement = platforms.place("cpu", "cpu")
  assert placement.notes == ()
  mesh = sharding.data_mesh(placement.train_devices)
  tree = {"w": jax.device_put(np.arange(4.0), sharding.replicated(mesh))}
  evaluator = evaluate.Evaluator(placement.eval_device, ModelConfig(vocab_size=5),
                                 SampleConfig())
  copied = evaluator.place(tree)
  assert copied["w"].devices() == {placement.eval_device}
  np.testing.assert_array_equal(copied["w"], np.arange(4.0))


@without_accelerator
@pytest.mark.parametrize("jax_platforms", ["METAL,cpu",
                                           pytest.param("tpu,cpu", marks=pytest.mark.slow)])
def test_a_listed_backend_that_cannot_start_falls_back_with_one_warning(run_cli, tmp_path,
                                                                         jax_platforms):
  """JAX_PLATFORMS is read when JAX starts: in a process of its own."""
  write_corpus(tmp_path / "c.txt")
  result = run_cli("--data=c.txt", *as_args(RUN), env={"JAX_PLATFORMS": jax_platforms})
  assert result.returncode == 0, result.stderr
  warnings = [line for line in result.stdout.splitlines() if line.startswith("⚠")]
  assert len(warnings) == 1 and warnings[0].endswith("; evaluating on CPU"), result.stdout
  assert jax_platforms.split(",")[0] in warnings[0]
  assert "val " in result.stdout and "Traceback" not in result.stderr
  assert (tmp_path / "runs/default/samples.txt").exists()


@needs_gpu
def test_a_gpu_evaluates_while_the_cpu_trains():
  placement = platforms.place("cpu", "auto")
  assert {d.platform for d in placement.train_devices} == {"cpu"}
  assert placement.eval_device.platform == "gpu"
  assert placement.notes == (f"✓ GPU enabled for evaluation: gpu:{placement.eval_device.id}",)


@needs_gpu
def test_losses_estimated_on_the_gpu_match_the_cpu(tmp_path):
  corpus = write_corpus(tmp_path / "c.txt")
  losses = {}
  for eval_platform in ("cpu", "gpu"):
    run_training(tmp_path / eval_platform, **(RUN | {"data": corpus, "iters": 30,
                                                     "eval_platform": eval_platform}))
    losses[eval_platform] = [r["val_loss"] for r in read_metrics(tmp_path / eval_platform)
                             if "val_loss" in r]
  assert len(losses["cpu"]) == 3
  assert losses["gpu"] == pytest.approx(losses["cpu"], abs=2e-3)


@needs_gpu
def test_training_on_a_gpu_by_auto(tmp_path, capsys):
  run_training(tmp_path / "w", **RUN, data=write_corpus(tmp_path / "c.txt"),
               train_platform="auto")
  stdout = capsys.readouterr().out
  assert "✓ GPU enabled for training: gpu:0" in stdout
  assert "✓ GPU enabled for evaluation: gpu:0" in stdout
  assert (tmp_path / "w" / "samples.txt").exists()


class FakeDevice:
  def __init__(self, platform: str):
    self.platform = platform


def fake_devices(*platforms_present: str):
  """jax.devices as a machine with these platforms would answer (the first is the
  default), for the suite's own accelerator check."""
  def devices_of(name=None):
    name = name or platforms_present[0]
    matching = [p for p in platforms_present
                if p == name or (name in ("cuda", "rocm") and p == "gpu")]
    if not matching:
      raise RuntimeError(f"Unknown backend {name}")
    return [FakeDevice(p) for p in matching]
  return devices_of


@pytest.mark.parametrize("present, found", [
    (("cpu",), []),
    (("METAL", "cpu"), ["METAL"]),  # jax-metal on a Mac.
    (("mps", "cpu"), ["mps"]),  # The community plugin.
    (("gpu", "cpu"), ["gpu"]),  # CUDA or ROCm.
    (("tpu", "cpu"), ["tpu"]),
    (("vulkan", "cpu"), ["vulkan"]),  # A plugin of another name, as JAX's default.
])
def test_the_suite_sees_every_accelerator(present, found):
  """conftest's check, which skips the tests that assert the fallback to the CPU."""
  assert conftest.accelerator_platforms(fake_devices(*present)) == found


def test_the_suite_s_work_runs_on_the_cpu_unless_placed():
  assert conftest.accelerator_platforms() == conftest.ACCELERATORS
  assert jax.numpy.zeros(()).devices() == {jax.devices("cpu")[0]}
