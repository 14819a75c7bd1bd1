"""The placement's choices: device counts, microbatches, evaluation chunks, and their reasons."""

import pytest

from randygpt.errors import UserError

from randygpt.config import ModelConfig, TrainConfig
from randygpt.bench.shapes import SHAPES
from randygpt.runtime import footprint, placement
from randygpt.runtime.cores import Cores, usable_cores

from conftest import run_config, tiny


@pytest.mark.parametrize("spec, devices, expected", [
    ("6/8/128/64/32", 2, 4),  # 1024 tokens a device: 4 slices of 256 (19 MB each).
    ("6/8/128/64/32", 1, 8),
    ("4/4/128/64/12", 2, 1),  # 384 tokens a device already fit (16 MB): no slicing.
    ("2/4/64/64/32", 2, 1),  # A small model: 1024 tokens take 13 MB.
    ("6/8/256/128/32", 2, 8),  # 256 tokens take 38 MB, but smaller slices starve the matmuls.
    ("6/8/128/64/12", 2, 1),  # Slices must divide each device's 6 rows: 2 x 192 is too few.
    ("6/8/128/1024/3", 1, 3),  # Even one sequence is over: one sequence a slice.
    ("1/1/32/8/2", 2, 1),
])
def test_cpu_slices_fit_the_caches_and_keep_the_matmuls_busy(spec, devices, expected):
  n_layer, n_head, n_embd, block_size, batch_size = map(int, spec.split("/"))
  mc = ModelConfig(vocab_size=65, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
                   block_size=block_size)
  got = placement.train_microbatches(TrainConfig(batch_size=batch_size), mc, "cpu", devices)
  assert got == expected
  rows = batch_size // devices
  tokens = rows // got * block_size
  assert rows % got == 0
  fits = footprint.activations(mc, tokens) <= placement.CPU_SLICE_ACTIVATION_BYTES
  # Either the slices fit and one fewer (the next divisor down) would not, or none fit and
  # the slices are the smallest that keep CPU_MIN_SLICE_TOKENS (or one sequence).
  fewer = max([n for n in placement.divisors(rows) if n < got], default=None)
  if fits and fewer:
    assert (footprint.activations(mc, rows // fewer * block_size)
            > placement.CPU_SLICE_ACTIVATION_BYTES)
  if not fits:
    smaller = [n for n in placement.divisors(rows) if n > got]
    assert not smaller or rows // smaller[0] * block_size < placement.CPU_MIN_SLICE_TOKENS


@pytest.mark.parametrize("platform, requested, expected", [("gpu", 0, 1), ("cpu", 2, 2)])
def test_microbatches_elsewhere_and_requested(platform, requested, expected):
  tc = TrainConfig(batch_size=32, microbatches=requested)
  assert placement.train_microbatches(tc, ModelConfig(block_size=64), platform, 2) == expected


@pytest.mark.parametrize("platform, dtype, attention, n_head, expected", [
    ("cpu", "auto", "auto", 8, ("float32", "einsum")),  # Today's CPU step, unchanged.
    ("gpu", "auto", "auto", 8, ("bfloat16", "cudnn")),  # head_dim 16.
    ("cuda", "auto", "auto", 2, ("bfloat16", "cudnn")),  # head_dim 64.
    ("gpu", "auto", "auto", 1, ("bfloat16", "cudnn")),  # head_dim 128: cuDNN's limit.
    ("gpu", "auto", "auto", 32, ("bfloat16", "einsum")),  # head_dim 4: not a multiple of 8.
    ("rocm", "auto", "auto", 8, ("bfloat16", "einsum")),
    ("tpu", "auto", "auto", 8, ("bfloat16", "einsum")),
    ("METAL", "auto", "auto", 8, ("float32", "einsum")),
    ("gpu", "float32", "auto", 8, ("float32", "einsum")),  # Given: kept, the rest follows it.
    ("cpu", "bfloat16", "xla", 8, ("bfloat16", "xla")),
    ("gpu", "auto", "einsum", 8, ("bfloat16", "einsum")),
    ("cpu", "bfloat16", "cudnn", 8, ("bfloat16", "xla")),  # Recorded on a GPU, resumed here.
])
def test_compute_settings_resolve_auto_by_the_training_platform(platform, dtype, attention,
                                                                 n_head, expected):
  mc = ModelConfig(n_embd=128, n_head=n_head, compute_dtype=dtype, attention=attention)
  assert placement.compute_settings(mc, platform) == dict(
      zip(("compute_dtype", "attention"), expected))


def test_cudnn_attention_where_it_cannot_run_is_refused_when_given():
  mc = ModelConfig(n_embd=128, n_head=8, attention="cudnn")
  with pytest.raises(UserError, match=r"^--attention=cudnn needs an NVIDIA GPU training in "
                     r"bfloat16 .* this run trains on cpu in float32 with head_dim 16\. Use "
                     r"--attention=xla or einsum\.$"):
    placement.compute_settings(mc, "cpu", frozenset({"attention"}))


@pytest.mark.parametrize("n", [1, 12, 97, 360, 10**9 + 7])
def test_divisors(n):
  assert placement.divisors(n) == [d for d in range(1, min(n, 400) + 1) if n % d == 0] + (
      [n] if n > 400 else [])


AUTO = "automatic: slices of 256 tokens on each device, 19.1 MB of activations"


@pytest.mark.parametrize("requested, explicit, resumed, batch_size, expected", [
    (0, False, False, 32, (4, AUTO)),
    (2, True, False, 32, (2, "--microbatches")),
    (8, False, True, 32, (8, "kept from the checkpoint")),
    (8, False, True, 12, (1, "automatic: slices of 384 tokens on each device, 28.6 MB of "
                             "activations")),  # A new batch size that 8 does not divide.
])
def test_the_microbatch_choice_says_why(requested, explicit, resumed, batch_size, expected):
  tc = TrainConfig(batch_size=batch_size, microbatches=requested)
  mc = ModelConfig(vocab_size=65, block_size=64)
  assert placement.choose_microbatches(tc, mc, "cpu", devices=2, explicit=explicit,
                                   resumed=resumed) == expected


@pytest.mark.parametrize("count, tokens_each, max_tokens, expected", [
    (200, 2048, 2048, 1), (200, 2048, 20000, 8), (200, 256, 2048, 8), (7, 256, 2048, 7),
    (7, 512, 2048, 1), (20, 4096, 2048, 1), (10**9, 64, 512, 8), (10**9 + 7, 64, 512, 1)])
def test_largest_fitting_divisor(count, tokens_each, max_tokens, expected):
  assert placement.largest_fitting_divisor(count, tokens_each, max_tokens) == expected


@pytest.mark.parametrize("vocab_size", [65, 5000])
def test_accelerator_chunks_are_sized_in_bytes_of_logits(vocab_size):
  cfg = ModelConfig(vocab_size=vocab_size, n_embd=64, n_head=4, n_layer=2, block_size=256)
  tc = TrainConfig(batch_size=64, eval_iters=200)
  tokens = placement.eval_chunk_tokens(tc, cfg, "gpu")
  assert tokens * vocab_size * 4 <= placement.EVAL_CHUNK_BYTES  # float32 logits.
  assert tokens * 2 * vocab_size * 4 > placement.EVAL_CHUNK_BYTES  # The fewest chunks.
  # On the CPU, whole batches (as the loss estimates always ran) unless one batch's logits
  # are over the limit; then whole windows, within the CPU's limit of tokens.
  want_cpu = 64 * 256 if vocab_size == 65 else 8 * 256
  assert placement.eval_chunk_tokens(tc, cfg, "cpu") == want_cpu


def test_the_device_count_s_reason():
  two, one = Cores(2, 2), Cores(1, 1, "affinity: 1 of 2 CPUs")
  assert placement.why_device_count(2, False, 1, "cpu", two, 2) == "kept from the run's flags.cfg"
  assert placement.why_device_count(0, False, 1, "cpu", one, 1) == (
      "automatic: 1 usable core (affinity: 1 of 2 CPUs), each device at least 256 tokens of "
      "the batch, dividing it")
  assert placement.why_device_count(4, True, 1, "cpu", two, 4) == "--num_cpu_devices"
  # A resume on fewer cores than its first start keeps its count, and says so.
  assert placement.why_device_count(8, False, 1, "cpu", two, 8) == (
      "kept from the run's flags.cfg, more than 2 usable cores: the same losses, more slowly; "
      "--num_cpu_devices changes it")


def test_batch_must_divide_across_devices():
  placement.check_batch_divides(8, 4)
  with pytest.raises(UserError, match="--batch_size=8 does not divide evenly across 3 devices"):
    placement.check_batch_divides(8, 3)


def test_requested_and_multi_process_device_counts():
  assert placement.cpu_device_count(3, 5, block_size=64, n_cores=2) == 3  # Checked later.
  assert placement.cpu_device_count(0, 32, num_processes=2, block_size=64, n_cores=16) == 1
  assert placement.cpu_device_count(0, 32, block_size=64, n_cores=16) == 8


def choices(spec: str, n_cores: int) -> tuple[int, int]:
  """(devices, microbatches) the rule picks at a shape (L/H/D/T/B/dropout or a preset)."""
  n_layer, n_head, n_embd, block, batch, _ = SHAPES.get(spec) or tuple(
      map(float, spec.split("/")))
  mc = ModelConfig(vocab_size=65, n_embd=int(n_embd), n_head=int(n_head),
                   n_layer=int(n_layer), block_size=int(block))
  devices = placement.auto_device_count(n_cores, int(batch), int(block))
  return devices, placement.train_microbatches(TrainConfig(batch_size=int(batch)), mc, "cpu",
                                               devices)


# What 2 cores took before the rule knew other counts (docs/measurements.md): the same.
@pytest.mark.parametrize("spec, expected", [
    ("tiny", (2, 1)), ("nanogpt", (2, 1)), ("default", (2, 4)), ("default-d0", (2, 4)),
    ("medium", (2, 8)), ("3/6/192/96/16/0.1", (2, 2)), ("2/2/64/32/128/0", (2, 1)),
    ("1/4/32/16/4/0", (2, 1)),  # The tests' tiny run: 64 tokens, still 2 devices.
    ("1/1/32/8/5/0", (1, 1)),  # An odd batch: one device.
])
def test_two_cores_choose_as_before(spec, expected):
  assert choices(spec, 2) == expected


@pytest.mark.parametrize("n_cores, spec, expected", [
    (1, "default", (1, 8)), (1, "tiny", (1, 2)), (1, "medium", (1, 16)),
    (3, "default", (2, 4)),  # 3 does not divide 32: two devices, the third core in XLA's pool.
    (3, "nanogpt", (3, 1)),  # 12 rows of 64: three devices of 256 tokens.
    (4, "default", (4, 2)), (4, "medium", (4, 4)), (4, "nanogpt", (3, 1)),
    (16, "default", (8, 1)),  # 8 devices of 256 tokens; 16 would have 128 each.
    (16, "tiny", (8, 1)), (16, "medium", (16, 1)), (16, "nanogpt", (3, 1)),
    (64, "default", (8, 1)), (64, "medium", (16, 1)), (64, "2/2/64/32/128/0", (16, 1)),
    (128, "4/4/128/256/128/0", (128, 1)),
])
def test_the_rule_at_other_core_counts(n_cores, spec, expected):
  assert choices(spec, n_cores) == expected


@pytest.mark.parametrize("affinity, quota, expected", [
    (frozenset({0}), None, 1),  # taskset -c 0.
    (frozenset(range(64)), 4.0, 4),  # A container's --cpus=4 on a 64-core host.
    (frozenset(range(64)), 2.5, 2),  # 3 CPUs of time, but 3 does not divide 32.
    (frozenset(range(16)), None, 8),
])
def test_the_rule_from_what_the_system_says(affinity, quota, expected):
  machine = usable_cores(64, affinity, quota)
  assert placement.cpu_device_count(0, 32, block_size=64, n_cores=machine.cores) == expected


def test_the_plan_takes_the_cores_it_is_given():
  one = Cores(1, 1, "affinity: 1 of 2 CPUs")
  config, plan = placement.plan(run_config(**tiny()).replace(vocab_size=65), resumed=False,
                                machine=one)
  assert plan.mesh.size == 1 and config.location.num_cpu_devices == 1
  assert plan.why_devices.startswith("automatic: 1 usable core (affinity: 1 of 2 CPUs)")


def test_automatic_devices_are_as_many_as_the_memory_holds():
  """Each device holds the whole train state: a machine of many cores and little memory
  takes fewer devices rather than refusing the run."""
  config = run_config(**tiny(n_embd=256, n_layer=4, batch_size=32)).replace(vocab_size=65)
  need = {n: placement.cpu_bytes_needed(config, n) for n in (1, 2, 4, 8)}
  assert need[1] < need[2] < need[4] < need[8]
  assert placement.devices_memory_holds(config, 8, need[8]) == 8
  assert placement.devices_memory_holds(config, 8, need[8] - 1) == 4
  assert placement.devices_memory_holds(config, 8, need[2]) == 2
  assert placement.devices_memory_holds(config, 8, need[1] - 1) == 1  # The check refuses it.
