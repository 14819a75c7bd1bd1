"""Where training, evaluation and sampling run, and the fallback to the CPU."""

import collections
import dataclasses

import jax
import numpy as np
import pytest

from randygpt import evaluate, trainer
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt import sharding
from randygpt.runtime import placement, platforms

import conftest
from conftest import (as_args, needs_gpu, raises_user_error, read_metrics, run_config,
                      run_training, sample_in_process, tiny, without_accelerator, write_corpus)

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


# A Mac with jax-mps, without one: the second CPU device stands in for its GPU, labelled
# with the plugin's platform, `mps`, through the run's `place` and `executor` arguments.

MPS_ERROR = "UNIMPLEMENTED: a stand-in for an operation jax-mps lacks"


def on_mps(train: bool = False, train_devices: int = 1):
  """A `place` that evaluates on the stand-in GPU as auto chooses it, and trains there when
  `train` (on `train_devices` stand-ins: more than one is a multi-process run's)."""
  def place(train_platform, eval_platform, num_cpu_devices=0):
    del train_platform, eval_platform
    gpu = jax.devices("cpu")[1]
    chosen = platforms.place("cpu", "cpu", num_cpu_devices)
    fields = dict(eval_device=gpu, eval_platform="mps", eval_flag="auto",
                  eval_notes=(platforms.enabled(gpu, "evaluation", "mps"),))
    if train:
      fields |= dict(train_devices=tuple(jax.devices("cpu")[2 - train_devices:]),
                     train_platform="mps", train_on_accelerator=True,
                     train_notes=(platforms.enabled(gpu, "training", "mps"),))
    return dataclasses.replace(chosen, **fields)
  return place


class Recorder:
  """An executor that records the devices and shapes of the arrays each kind of work left
  alive (its copies of weights and windows, its state and results; an estimate's views of the
  training state's replicas too); `fail`: the kind that raises."""

  def __init__(self, fail: str = ""):
    self.fail, self.devices, self.calls = fail, collections.defaultdict(set), []

  def __call__(self, what, work):
    self.calls.append(what)
    if what == self.fail:
      raise RuntimeError(f"{MPS_ERROR}\nand a second line")
    before = {id(x) for x in jax.live_arrays()}
    result = work()
    self.devices[what] |= {(d, x.shape) for x in jax.live_arrays() if id(x) not in before
                           for d in x.devices()}
    return result


MPS_RUN = tiny(iters=4, eval_interval=2, log_interval=2, checkpoint_interval=2,
               prompt=("ANNA:",), max_new_tokens=8, eval_platform="auto")


def test_jax_mps_evaluates_and_samples_a_run_on_its_one_device(tmp_path, capsys):
  recorder = Recorder()
  summary = trainer.run(run_config(workdir=tmp_path / "w", data=write_corpus(
      tmp_path / "c.txt"), **MPS_RUN), on_mps(), recorder)
  out = capsys.readouterr().out
  assert summary["status"] == "completed" and summary["eval_fallback"] is None
  assert "✓ Metal GPU (mps) enabled for evaluation: mps:1" in out
  assert "devices: 2 x cpu" in out  # Training stays on the CPU unless asked.
  # The estimates at 2 and 4, the final one over the whole val split, the sample.
  assert recorder.calls == ["probe-estimate", "probe-sample", "estimate", "estimate", "estimate",
                            "sample"]
  # The estimates' windows (eval_iters x batch_size, block_size) are on the stand-in, so
  # their computations ran there (a jit with arguments on two devices fails).
  gpu = jax.devices("cpu")[1]
  assert {d for d, shape in recorder.devices["estimate"] if shape == (8, 16)} == {gpu}
  assert {d for d, _ in recorder.devices["sample"]} == {gpu}  # The weights' copies.
  assert [r["iter"] for r in read_metrics(tmp_path / "w") if "val_loss" in r] == [2, 4]


def test_jax_mps_that_fails_hands_evaluation_to_the_cpu_in_one_line(tmp_path, capsys):
  summary = trainer.run(run_config(workdir=tmp_path / "w", data=write_corpus(
      tmp_path / "c.txt"), **MPS_RUN), on_mps(), Recorder(fail="estimate"))
  out = capsys.readouterr().out
  assert summary["status"] == "completed"
  assert summary["eval_fallback"] == {"at_iter": 2, "backend": "mps:1", "error": MPS_ERROR,
                                      "during": "evaluation"}
  warnings = [line for line in out.splitlines() if line.startswith("⚠")]
  assert warnings == [f"⚠ Metal GPU (mps) (mps:1) failed during evaluation ({MPS_ERROR}); "
                      "evaluating and sampling on CPU from here on."]
  assert (tmp_path / "w" / "samples.txt").read_text().count("ANNA:") == 1


def test_jax_mps_samples_a_restored_checkpoint_on_its_one_device(trained, capsys):
  recorder = Recorder()
  sample_in_process("--workdir=w", "--prompt=ANNA:", "--eval_platform=auto", place=on_mps(),
                    executor=recorder)
  out = capsys.readouterr().out
  assert "✓ Metal GPU (mps) enabled for evaluation: mps:1" in out and "ANNA:" in out
  assert recorder.calls == ["probe-sample", "sample"]
  assert {d for d, _ in recorder.devices["sample"]} == {jax.devices("cpu")[1]}
  failing = Recorder(fail="sample")
  sample_in_process("--workdir=w", "--prompt=ANNA:", "--eval_platform=auto", place=on_mps(),
                    executor=failing)
  fell_back = capsys.readouterr().out
  assert f"⚠ Metal GPU (mps) (mps:1) failed during sampling ({MPS_ERROR});" in fell_back
  assert fell_back.split("ANNA:", 1)[1] == out.split("ANNA:", 1)[1]  # The CPU's, the same.


def test_training_on_jax_mps_resumes_its_checkpoint_on_its_one_device(trained, capsys):
  recorder = Recorder()
  summary = trainer.run(run_config(workdir="w", resume=True, **MPS_RUN | {"iters": 22}),
                        on_mps(train=True), recorder)
  out = capsys.readouterr().out
  assert summary["status"] == "completed", summary
  assert "✓ Metal GPU (mps) enabled for training: mps:1" in out
  assert "devices: 1 x mps (data-parallel; training on mps)" in out
  assert "Resumed from w/checkpoints/latest/20" in out
  assert recorder.calls.count("train-step") == 2
  # The new state and metrics: where the restored state was placed.
  assert {d for d, _ in recorder.devices["train-step"]} == {jax.devices("cpu")[1]}


def test_training_on_jax_mps_with_more_than_one_device_is_refused_in_one_line(tmp_path):
  config = run_config(workdir=tmp_path / "w", **MPS_RUN).replace(vocab_size=53)
  with raises_user_error("--train_platform=cpu: Metal GPU (mps) trains on one device, and "
                         "this run would train on 2 (one per process); train in one process, "
                         "or on the CPU: --train_platform=cpu."):
    placement.plan(config, resumed=False, place=on_mps(train=True, train_devices=2))
  one = placement.plan(config, resumed=False, place=on_mps(train=True))[1]
  assert one.mesh.size == 1 and one.platform == "mps"


def test_apple_s_gpu_evaluates_when_present_and_trains_only_when_named():
  assert "mps" in platforms.EVAL_AUTO and "METAL" in platforms.EVAL_AUTO
  assert not {"mps", "METAL"} & set(platforms.TRAIN_AUTO)
  assert platforms.CHOICES["mps"] == "mps" and set(platforms.ONE_DEVICE) == {"mps", "METAL"}


def test_a_plugin_as_jax_s_default_backend_gets_no_work_it_was_not_given(tmp_path):
  """jax-mps makes itself JAX's default backend: a run's work placed nowhere in particular
  (its random keys, its windows' draws) still runs on the CPU, so a plugin that fails cannot
  break the start. The second CPU device stands in for the plugin as JAX's default."""
  plugin, cpu = jax.devices("cpu")[1], jax.devices("cpu")[0]
  (tmp_path / "w").mkdir()  # As trainer.run's claim makes it.
  before = {id(x) for x in jax.live_arrays()}
  with jax.default_device(plugin):
    setup = trainer.prepare(run_config(workdir=tmp_path / "w", data=write_corpus(
        tmp_path / "c.txt"), num_cpu_devices=1, **MPS_RUN | {"eval_platform": "cpu"}))
  assert setup.plan.placement.eval_device == cpu and setup.mesh.devices.tolist() == [cpu]
  left = {d for x in jax.live_arrays() if id(x) not in before for d in x.devices()}
  assert left == {cpu}  # The state, and the keys its window sampler and evaluator hold.
