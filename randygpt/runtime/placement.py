"""How a run uses the machine: how many devices train, in how many microbatches, in how many
chunks a loss estimate runs, and whether the machine's memory holds it all. Decided once,
before anything big is allocated; the header says what was chosen and why.

Flags override every automatic choice; a resumed run keeps the counts its checkpoint and
flags.cfg record.
"""

import dataclasses
import math

import jax

from randygpt import evaluate, model, sharding
from randygpt.config import ModelConfig, RunConfig, TrainConfig
from randygpt.errors import UserError
from randygpt.runtime import cores, footprint, memory, platforms

# A train step on the CPU runs its batch in slices (microbatches), each device's share of a
# slice small enough for its activations to stay in the CPU's caches, but not so small that
# its matmuls (the weight gradients are D x tokens x D) stop filling the cores. Both bounds
# measured over devices x microbatches at seven shapes (docs/measurements.md, "The
# automatic choices across shapes").
CPU_SLICE_ACTIVATION_BYTES = 20 << 20
CPU_MIN_SLICE_TOKENS = 256
# Tokens per loss-estimate chunk on the CPU: chunks past ~2K tokens fall out of cache and
# run 2.5x slower (docs/measurements.md, "Evaluation and generation"). Elsewhere a chunk's
# logits may take EVAL_CHUNK_BYTES: accelerators gain from large batches, and the bytes
# (tokens x vocabulary), not the tokens, are what must fit.
EVAL_CHUNK_TOKENS = {"cpu": 2048}
EVAL_CHUNK_BYTES = 64 << 20


# Training devices on the CPU: one per physical core this process may use
# (runtime/cores.py), as long as each keeps at least CPU_MIN_SLICE_TOKENS tokens of the batch
# (its matmuls would no longer fill a core: the bound the microbatches keep), and up to
# AUTO_FLOOR_DEVICES whatever the batch (on 2 cores two devices were never more than 5% slower
# than one, at any shape measured). XLA's CPU devices share one pool of threads, one per
# usable CPU: a device is not a thread, but its own stream of work for the pool. Measured in
# docs/measurements.md, "Data parallelism" and "Across core counts".
AUTO_FLOOR_DEVICES = 2
MAX_CPU_DEVICES = 256  # XLA's CPU collectives stall past this (docs/measurements.md).


def auto_device_count(n_cores: int, batch_size: int, block_size: int) -> int:
  """The automatic training device count on the CPU for `n_cores` usable physical cores: the
  largest divisor of the batch up to the cores, each device at least CPU_MIN_SLICE_TOKENS
  tokens of the batch (or up to AUTO_FLOOR_DEVICES)."""
  by_tokens = max(AUTO_FLOOR_DEVICES, batch_size * block_size // CPU_MIN_SLICE_TOKENS)
  top = min(max(n_cores, 1), by_tokens, MAX_CPU_DEVICES)
  return max(n for n in divisors(batch_size) if n <= top)


def cpu_device_count(requested: int, batch_size: int, num_processes: int = 1, *,
                     block_size: int, n_cores: int) -> int:
  """`requested`, or for 0 (auto) `auto_device_count`; one per process in a multi-process
  run."""
  if requested or num_processes > 1:
    return requested or 1
  return auto_device_count(n_cores, batch_size, block_size)


def why_device_count(requested: int, explicit: bool, num_processes: int, platform: str,
                     machine: cores.Cores, devices: int) -> str:
  """The header's reason for the training device count (`devices` of them)."""
  if platform != "cpu":
    return f"training on {platform}"
  if num_processes > 1:
    return "one per process"
  usable = (f"{machine.cores} usable core{'s' if machine.cores > 1 else ''}"
            + (f" ({machine.why})" if machine.why else ""))
  if not requested:
    return (f"automatic: {usable}, each device at least {CPU_MIN_SLICE_TOKENS} tokens of the "
            "batch, dividing it")
  if explicit:
    return "--num_cpu_devices"
  if devices > machine.cores:  # A resume on a machine with fewer cores than the run's first.
    return (f"kept from the run's flags.cfg, more than {usable}: the same losses, more "
            "slowly; --num_cpu_devices changes it")
  return "kept from the run's flags.cfg"


def check_batch_divides(batch_size: int, n_devices: int) -> None:
  if batch_size % n_devices:
    raise UserError(f"--batch_size={batch_size} does not divide evenly across {n_devices} "
                    f"devices; use a multiple of {n_devices} or another --num_cpu_devices.")


def check_one_device(platform: str, n_devices: int, flag: str) -> None:
  """Apple's GPU trains alone: no collectives between devices (jax-mps, jax-metal)."""
  if platform in platforms.ONE_DEVICE and n_devices > 1:
    raise UserError(f"--train_platform={flag}: {platforms.LABELS[platform]} trains on one "
                    f"device, and this run would train on {n_devices} (one per process); "
                    "train in one process, or on the CPU: --train_platform=cpu.")


def divisors(n: int) -> list[int]:
  """The divisors of n, ascending (sqrt(n) steps: --batch_size may be 10**9)."""
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted({*small, *(n // d for d in small)})


def largest_fitting_divisor(count: int, tokens_each: int, max_tokens: int) -> int:
  """The largest divisor n of `count` (at least 1) whose n items of `tokens_each` tokens
  hold at most `max_tokens`: how many batches an estimate runs at once, or how many
  sequences a microbatch holds."""
  return max([n for n in divisors(count) if n * tokens_each <= max_tokens], default=1)


def train_microbatches(tc: TrainConfig, model_config: ModelConfig, platform: str,
                       devices: int = 1) -> int:
  """--microbatches, or for 0: on the CPU the fewest slices whose share on each of `devices`
  holds at most CPU_SLICE_ACTIVATION_BYTES of activations, but no fewer than
  CPU_MIN_SLICE_TOKENS tokens (the count dividing each device's rows, so that slices stay on
  their devices); elsewhere 1."""
  if tc.microbatches or platform != "cpu":
    return tc.microbatches or 1
  rows, t = tc.batch_size // devices, model_config.block_size
  counts = [n for n in divisors(rows) if rows // n * t >= CPU_MIN_SLICE_TOKENS] or [1]
  fitting = [n for n in counts if footprint.activations(model_config, rows // n * t)
             <= CPU_SLICE_ACTIVATION_BYTES]
  return min(fitting) if fitting else max(counts)


def choose_microbatches(tc: TrainConfig, model_config: ModelConfig, platform: str, *,
                        devices: int, explicit: bool, resumed: bool) -> tuple[int, str]:
  """The step's microbatch count and the header's reason: --microbatches when `explicit`,
  else the checkpoint's on a resume (unless a new --batch_size no longer divides by it),
  else automatic. The count goes into the run's config: flags.cfg and the checkpoints keep
  it, so a resume or a repeat from flags.cfg takes the same step."""
  if tc.microbatches and explicit:
    return tc.microbatches, "--microbatches"
  if tc.microbatches and resumed and tc.batch_size % tc.microbatches == 0:
    return tc.microbatches, "kept from the checkpoint"
  auto = train_microbatches(dataclasses.replace(tc, microbatches=0), model_config, platform,
                            devices)
  if platform != "cpu":
    return auto, f"automatic on {platform}"
  tokens = tc.batch_size // (devices * auto) * model_config.block_size
  size = footprint.human_bytes(footprint.activations(model_config, tokens))
  return auto, f"automatic: slices of {tokens} tokens on each device, {size} of activations"


# Where "auto" computes in bfloat16: the platforms whose matrix units run it at several
# times float32's rate (docs/measurements.md, "GPU"); the CPU's fastest matmuls are float32's.
LOW_PRECISION_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def _cudnn_runs(model_config: ModelConfig, platform: str, dtype: str) -> bool:
  """Whether cuDNN's fused attention can run this model (JAX's check_is_flash_attention)."""
  k = model_config.head_dim
  return (platform in model.CUDNN_PLATFORMS and dtype == "bfloat16" and k % 8 == 0
          and k <= 128)


def compute_settings(model_config: ModelConfig, platform: str,
                     explicit: frozenset = frozenset()) -> dict:
  """--compute_dtype and --attention for training on `platform`, "auto" resolved: bfloat16
  with cuDNN's attention on an NVIDIA GPU (where the model fits it), bfloat16 on other
  accelerators, float32 and einsum on the CPU. A cudnn that cannot run here is refused when
  given (`explicit`), and runs as XLA's implementation when a checkpoint recorded it."""
  dtype = model_config.compute_dtype
  if dtype == "auto":
    dtype = "bfloat16" if platform in LOW_PRECISION_PLATFORMS else "float32"
  attention = model_config.attention
  if attention == "auto":
    attention = "cudnn" if _cudnn_runs(model_config, platform, dtype) else "einsum"
  elif attention == "cudnn" and not _cudnn_runs(model_config, platform, dtype):
    if "attention" in explicit:
      raise UserError(f"--attention=cudnn needs an NVIDIA GPU training in bfloat16 "
                      f"(--compute_dtype=bfloat16) and a head_dim that is a multiple of 8 up "
                      f"to 128; this run trains on {platform} in {dtype} with head_dim "
                      f"{model_config.head_dim}. Use --attention=xla or einsum.")
    attention = "xla"
  return {"compute_dtype": dtype, "attention": attention}


def eval_chunks(tc: TrainConfig, model_config: ModelConfig, platform: str) -> int:
  """How many chunks an estimate runs in on `platform`: the fewest whose size fits the
  platform's limit, in whole batches of windows unless one batch's logits exceed
  EVAL_CHUNK_BYTES (a vocabulary of thousands), then in windows."""
  max_tokens_by_bytes = EVAL_CHUNK_BYTES // (4 * model_config.vocab_size)  # float32 logits.
  max_tokens = min(EVAL_CHUNK_TOKENS.get(platform, max_tokens_by_bytes), max_tokens_by_bytes)
  block, windows = model_config.block_size, evaluate.eval_windows(tc)
  unit = tc.batch_size if tc.batch_size * block <= max_tokens_by_bytes else 1
  per_chunk = unit * largest_fitting_divisor(windows // unit, unit * block, max_tokens)
  return windows // per_chunk


def eval_chunk_tokens(tc: TrainConfig, model_config: ModelConfig, platform: str) -> int:
  """Tokens in one chunk of an estimate on `platform`."""
  return (evaluate.eval_windows(tc) * model_config.block_size
          // eval_chunks(tc, model_config, platform))


def smaller_eval_chunks(tc: TrainConfig, chunks: int) -> int | None:
  """The chunk count of chunks at most half as large as `chunks` chunks (a divisor of the
  windows), after an estimate ran out of memory; None when a chunk is one window."""
  windows = evaluate.eval_windows(tc)
  per_chunk = windows // chunks
  if per_chunk == 1:
    return None
  return windows // largest_fitting_divisor(windows, 1, per_chunk // 2)


def cpu_bytes_needed(config: RunConfig, devices: int, baseline: int = 0) -> int:
  """The memory check's estimate for training on `devices` CPU devices (each with its copy of
  the train state and its slice's activations), `baseline` bytes already resident."""
  mc, tc = config.model, config.train
  microbatches = tc.microbatches or train_microbatches(tc, mc, "cpu", devices)
  return sum(footprint.estimate(mc, config.sample, tc, devices=devices,
                                microbatches=microbatches,
                                eval_chunk_tokens=eval_chunk_tokens(tc, mc, "cpu"),
                                baseline_bytes=baseline).values())


def devices_memory_holds(config: RunConfig, devices: int, available: int,
                         baseline: int = 0) -> int:
  """The largest count up to `devices` dividing the batch that `cpu_bytes_needed` fits in
  `available` bytes; 1 when none does (the memory check then refuses the run)."""
  fitting = [n for n in divisors(config.train.batch_size)
             if n <= devices and cpu_bytes_needed(config, n, baseline) <= available]
  return max(fitting, default=1)


def _fewer_for_memory(config: RunConfig, placement: platforms.Placement):
  """The placement with as many of its automatic CPU devices as this machine's memory holds
  (each holds the whole train state), and the header's note when that is fewer."""
  loc, devices = config.location, placement.train_devices
  if loc.num_cpu_devices or loc.num_processes > 1 or devices[0].platform != "cpu":
    return placement, ""
  held = devices_memory_holds(config, len(devices), footprint.physical_memory(),
                              memory.resident_bytes())
  if held == len(devices):
    return placement, ""
  return (dataclasses.replace(placement, train_devices=devices[:held]),
          f"; {held}: this machine's memory holds {held} copies of the train state")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where a run trains and evaluates, and the header's reasons for its counts."""
  placement: platforms.Placement
  mesh: jax.sharding.Mesh
  why_devices: str
  why_microbatches: str

  @property
  def platform(self) -> str:
    """The training devices' JAX platform."""
    return self.placement.train_platform


def plan(config: RunConfig, *, resumed: bool, place=platforms.place,
         machine: cores.Cores | None = None) -> tuple[RunConfig, Plan]:
  """The config with the chosen microbatch and device counts (so that flags.cfg and the
  checkpoints keep them) and the plan: the devices that train and evaluate (`place` chooses
  them from the flags), the training mesh, the header's reasons. `machine`: the cores this
  process may use (None: as the system says). A run the machine's memory cannot hold is
  refused here, before anything big is allocated."""
  mc, tc, loc = config.model, config.train, config.location
  machine = machine or cores.usable()
  placement = place(loc.train_platform, loc.eval_platform, cpu_device_count(
      loc.num_cpu_devices, tc.batch_size, loc.num_processes, block_size=mc.block_size,
      n_cores=machine.cores))
  placement, memory_note = _fewer_for_memory(config, placement)
  mesh = sharding.data_mesh(placement.train_devices)
  platform = placement.train_platform
  check_one_device(platform, mesh.size, loc.train_platform)
  check_batch_divides(tc.batch_size, mesh.size)
  microbatches, why_microbatches = choose_microbatches(
      tc, mc, platform, devices=mesh.size, explicit="microbatches" in config.explicit,
      resumed=resumed)
  why_devices = why_device_count(loc.num_cpu_devices, "num_cpu_devices" in config.explicit,
                                 loc.num_processes, platform, machine, mesh.size) + memory_note
  config = config.replace(microbatches=microbatches,
                          **compute_settings(mc, platform, config.explicit))
  if platform == "cpu" and loc.num_processes == 1:
    config = config.replace(num_cpu_devices=mesh.size)
  eval_platform = placement.eval_platform
  footprint.check(mc, config.sample, tc, train_devices=mesh.local_devices,
                  eval_platform=eval_platform, microbatches=microbatches,
                  eval_chunk_tokens=eval_chunk_tokens(tc, mc, eval_platform))
  return config, Plan(placement, mesh, why_devices, why_microbatches)


def devices_line(config: RunConfig, plan: Plan, workdir) -> str:
  """The header's line about the devices and the step's slices."""
  mc, tc = config.model, config.train
  mb = tc.microbatches
  compute = ("" if (mc.compute_dtype, mc.attention) == ("float32", "einsum")
             else f"| {mc.compute_dtype} matmuls, {mc.attention} attention ")
  return (f"devices: {plan.mesh.size} x {plan.platform} (data-parallel; {plan.why_devices}) "
          f"| batch {tc.batch_size} x {mc.block_size} = {tc.batch_size * mc.block_size:,} "
          f"tokens/step in {mb} microbatch{'es' if mb > 1 else ''} ({plan.why_microbatches}) "
          f"{compute}| workdir: {workdir}")
