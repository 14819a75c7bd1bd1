"""`python -m randygpt.sample`: samples from a checkpoint alone."""

import pytest

from conftest import make_corpus, without_gpu

TINY = ["--n_embd=32", "--n_head=4", "--n_layer=2", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--eval_interval=10", "--seed=5"]


@pytest.fixture
def trained(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  result = run_cli("--data=c.txt", *TINY, "--iters=20", "--prompt=ANNA:", "--prompt=né",
                   "--max_new_tokens=30", "--workdir=w")
  assert result.returncode == 0, result.stderr
  (tmp_path / "c.txt").unlink()  # Sampling must not need the training text.
  return tmp_path / "w"


def test_reproduces_the_runs_samples_without_the_data(run_cli, trained):
  result = run_cli("--workdir=w", "--checkpoint=latest", "--prompt=ANNA:", "--prompt=né",
                   "--max_new_tokens=30", module="randygpt.sample")
  assert result.returncode == 0, result.stderr
  assert "checkpoint: w/checkpoints/latest/20 (iteration 20" in result.stdout
  for sample in (trained / "samples.txt").read_text(encoding="utf-8").split("\n\n")[:2]:
    assert sample in result.stdout


def test_sampling_flags_and_default_checkpoint(run_cli, trained):
  result = run_cli("--workdir=w", "--prompt=BORIS", "--max_new_tokens=50", "--top_k=1",
                   "--seed=9", module="randygpt.sample")
  assert result.returncode == 0, result.stderr
  assert "checkpoint: w/checkpoints/best/" in result.stdout
  printed = result.stdout.split("Generating samples...\n\n")[1]
  assert printed.startswith("BORIS") and len(printed) == len("BORIS") + 50 + len("\n\n")


@without_gpu
def test_greedy_batch_on_a_missing_accelerator_falls_back_to_the_cpu(run_cli, trained):
  result = run_cli("--workdir=w", "--prompt=ANNA", "--max_new_tokens=20", "--num_samples=3",
                   "--temperature=0", "--eval_platform=gpu", module="randygpt.sample")
  assert result.returncode == 0, result.stderr
  assert [line for line in result.stdout.splitlines() if line.startswith("⚠")] == [
      line for line in result.stdout.splitlines() if "--eval_platform=gpu" in line]
  printed = result.stdout.split("Generating samples...\n")[1]
  one = printed[:len(printed) // 3]
  assert one.startswith("\nANNA") and len(one) == len("\nANNA") + 20 + len("\n\n")
  assert printed == 3 * one  # Greedy: every stream the same.


@pytest.mark.parametrize("args, message", [
    (["--workdir=w", "--prompt=QX"], "not in the training text's vocabulary: 'Q' 'X'"),
    (["--workdir=nowhere"], "nowhere has no latest checkpoint"),
    (["--workdir=w", "--checkpoint=w/nothing"], "Checkpoint w/nothing does not exist"),
    (["--workdir=w", "--temperature=-1"], "--temperature=-1"),
    (["--workdir=w", "--num_samples=0"], "--num_samples=0"),
])
def test_mistakes_get_a_short_error(run_cli, trained, args, message):
  result = run_cli(*args, module="randygpt.sample")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert message in result.stderr, result.stderr
