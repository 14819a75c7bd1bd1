"""Data parallelism: the device count changes the speed, not the result."""

import json

import jax
import numpy as np
import pytest

from randygpt import checkpoint, optim, train
from randygpt.runtime import devices
from randygpt.config import ModelConfig, TrainConfig
from randygpt.errors import UserError

from conftest import make_corpus

TINY = ["--n_embd=32", "--n_head=4", "--n_layer=2", "--block_size=16", "--batch_size=8",
        "--eval_iters=2", "--eval_interval=10", "--log_interval=5", "--max_new_tokens=10",
        "--dropout=0.1"]


def test_batch_must_divide_across_devices():
  devices.check_batch_divides(8, 4)
  with pytest.raises(UserError, match="--batch_size=8 does not divide evenly across 3 devices"):
    devices.check_batch_divides(8, 3)
  mesh = devices.data_mesh(jax.devices())
  assert devices.batch_sharded(mesh).spec == jax.sharding.PartitionSpec("data")
  assert devices.replicated(mesh).spec == jax.sharding.PartitionSpec()


def losses(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir):
  path = checkpoint.Checkpoints(workdir).path("latest")
  meta = checkpoint.read_meta(path)
  c = meta["config"]
  config = ModelConfig(vocab_size=len(meta["vocab"]), n_embd=c["n_embd"], n_head=c["n_head"],
                       n_layer=c["n_layer"], block_size=c["block_size"])
  optimizer = optim.make_optimizer(TrainConfig(**{k: c[k] for k in ("learning_rate", "min_lr")}),
                                   c["lr_decay_iters"])
  return train.restore_or_init(jax.random.key(0), config, optimizer, path,
                               jax.sharding.SingleDeviceSharding(jax.devices()[0]))["params"]


@pytest.mark.slow
def test_same_result_on_1_2_and_4_devices(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  for n in (1, 2, 4):
    result = run_cli("--data=c.txt", *TINY, "--iters=20", f"--num_cpu_devices={n}",
                     f"--workdir=d{n}")
    assert result.returncode == 0, result.stderr
    assert f"devices: {n} x cpu (data-parallel)" in result.stdout
  reference = losses(tmp_path / "d1")
  for n in (2, 4):
    for got, want in zip(losses(tmp_path / f"d{n}"), reference, strict=True):
      for key in ("train_loss", "val_loss", "eval_train_loss", "lr"):
        assert got.get(key) == pytest.approx(want.get(key), abs=1e-4), (n, key, got["iter"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
                 final_params(tmp_path / f"d{n}"), final_params(tmp_path / "d1"))


def test_uneven_batch_is_refused_naming_both_numbers(run_cli, tmp_path):
  (tmp_path / "c.txt").write_text(make_corpus(), encoding="utf-8")
  result = run_cli("--data=c.txt", *TINY, "--iters=2", "--num_cpu_devices=3")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "--batch_size=8 does not divide evenly across 3 devices" in result.stderr


def test_auto_device_count_divides_the_batch(monkeypatch):
  monkeypatch.setattr("os.cpu_count", lambda: 2)
  assert devices.cpu_device_count(0, 32) == 2
  assert devices.cpu_device_count(0, 5) == 1
  assert devices.cpu_device_count(3, 5) == 3  # Asked for: checked later, with an error.
  assert devices.cpu_device_count(0, 32, num_processes=2) == 1
  monkeypatch.setattr("os.cpu_count", lambda: 1)
  assert devices.cpu_device_count(0, 32) == 1
