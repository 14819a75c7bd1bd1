"""Sampling from a checkpoint alone (`python -m randygpt.sample`, here in this process)."""

import pytest
from absl import flags

from randygpt.errors import UserError

from conftest import parsed_flags, sample_in_process, without_gpu


@pytest.fixture
def trained_without_data(trained):
  """The trained run (conftest.TRAINED: seed 5, prompts ANNA: and né, 30 new characters),
  its training text deleted: sampling must not need it."""
  (trained.parent / "c.txt").unlink()
  return trained


def sampled(capsys, *args):
  capsys.readouterr()
  sample_in_process(*args)
  return capsys.readouterr().out


def test_reproduces_the_runs_samples_without_the_data(trained_without_data, capsys):
  stdout = sampled(capsys, "--workdir=w", "--checkpoint=latest", "--prompt=ANNA:",
                   "--prompt=né", "--max_new_tokens=30")
  assert "checkpoint: w/checkpoints/latest/20 (iteration 20" in stdout
  samples = (trained_without_data / "samples.txt").read_text(encoding="utf-8").split("\n\n")
  for sample in samples[:2]:
    assert sample in stdout


def test_sampling_flags_and_default_checkpoint(trained_without_data, capsys):
  stdout = sampled(capsys, "--workdir=w", "--prompt=BORIS", "--max_new_tokens=50",
                   "--top_k=1", "--seed=9")
  assert "checkpoint: w/checkpoints/best/" in stdout
  printed = stdout.split("Generating samples...\n\n")[1]
  assert printed.startswith("BORIS") and len(printed) == len("BORIS") + 50 + len("\n\n")


@without_gpu
def test_greedy_batch_on_a_missing_accelerator_falls_back_to_the_cpu(trained_without_data,
                                                                     capsys):
  stdout = sampled(capsys, "--workdir=w", "--prompt=ANNA", "--max_new_tokens=20",
                   "--num_samples=3", "--temperature=0", "--eval_platform=gpu")
  warnings = [line for line in stdout.splitlines() if line.startswith("⚠")]
  assert len(warnings) == 1 and warnings == [
      line for line in stdout.splitlines() if "--eval_platform=gpu" in line]
  printed = stdout.split("Generating samples...\n")[1]
  one = printed[:len(printed) // 3]
  assert one.startswith("\nANNA") and len(one) == len("\nANNA") + 20 + len("\n\n")
  assert printed == 3 * one  # Greedy: every stream the same.


@pytest.mark.parametrize("args, message", [
    (["--workdir=w", "--prompt=QX"], "not in the training text's vocabulary: 'Q' 'X'"),
    (["--workdir=nowhere"], "nowhere has no latest checkpoint"),
    (["--workdir=w", "--checkpoint=w/nothing"], "Checkpoint w/nothing does not exist"),
])
def test_mistakes_get_a_short_error(trained_without_data, args, message):
  with pytest.raises(UserError, match=message) as info:
    sample_in_process(*args)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--temperature=-1"], "--temperature=-1"),
    (["--num_samples=0"], "--num_samples=0"),
])
def test_bad_flag_values_are_refused(args, message):
  import randygpt.sample  # noqa: F401  its flags
  with pytest.raises(flags.IllegalFlagValueError, match=message):
    with parsed_flags(*args):
      pass
