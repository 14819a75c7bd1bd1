"""Where training, evaluation and sampling run, and the fallback to the CPU."""

import pytest

import json

from randygpt.runtime import platforms

from conftest import make_corpus, needs_gpu, without_gpu

TINY = ["--n_embd=32", "--n_head=4", "--n_layer=1", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--eval_interval=10", "--iters=10", "--max_new_tokens=20"]


@without_gpu
def test_without_an_accelerator_everything_runs_on_the_cpu():
  placement = platforms.place("cpu", "auto")
  assert {d.platform for d in placement.train_devices} == {"cpu"}
  assert placement.eval_device.platform == "cpu"
  assert placement.notes == ("⚠ No accelerator found: evaluating on CPU",)


@without_gpu
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


def test_eval_copies_replicated_params_to_the_eval_device():
  import jax
  import numpy as np
  placement = platforms.place("cpu", "cpu")
  assert placement.notes == ()
  tree = {"w": jax.device_put(np.arange(4.0), placement.train_devices[0])}
  copied = placement.for_eval(tree)
  assert copied["w"].devices() == {placement.eval_device}
  np.testing.assert_array_equal(copied["w"], np.arange(4.0))


@without_gpu
@pytest.mark.parametrize("jax_platforms", ["METAL,cpu", "tpu,cpu"])
def test_a_listed_backend_that_cannot_start_falls_back_with_one_warning(run_cli, tmp_path,
                                                                         jax_platforms):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  result = run_cli("--data=c.txt", *TINY, env={"JAX_PLATFORMS": jax_platforms})
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
def test_losses_estimated_on_the_gpu_match_the_cpu(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  losses = {}
  for eval_platform in ("cpu", "gpu"):
    result = run_cli("--data=c.txt", *TINY, "--iters=30", "--eval_interval=10",
                     f"--eval_platform={eval_platform}", f"--workdir={eval_platform}")
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / eval_platform / "metrics.jsonl").read_text().splitlines()
    losses[eval_platform] = [json.loads(line)["val_loss"] for line in lines
                             if "val_loss" in line]
  assert len(losses["cpu"]) == 3
  assert losses["gpu"] == pytest.approx(losses["cpu"], abs=2e-3)


@needs_gpu
def test_training_on_a_gpu_by_auto(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  result = run_cli("--data=c.txt", *TINY, "--train_platform=auto")
  assert result.returncode == 0, result.stderr
  assert "✓ GPU enabled for training: gpu:0" in result.stdout
  assert "✓ GPU enabled for evaluation: gpu:0" in result.stdout
  assert (tmp_path / "runs/default/samples.txt").exists()
