"""Which devices train, and which estimate losses and generate.

Training runs on the CPU devices unless asked otherwise, as in randyGPT; evaluation and
generation run on the first accelerator that works (a CUDA/ROCm GPU, a TPU, Apple's GPU
through jax-metal or the community `mps` plugin), else on the CPU. An accelerator whose
backend fails to start, or fails its first computation, is dropped with one warning line
and the CPU takes its part: never a traceback.
"""

import dataclasses
import functools
import re

import jax
import numpy as np


# --train_platform / --eval_platform values and the JAX platform each names.
CHOICES = {"auto": "auto", "cpu": "cpu", "gpu": "gpu", "cuda": "cuda", "rocm": "rocm",
           "tpu": "tpu", "metal": "METAL", "mps": "mps"}
EVAL_AUTO = ("gpu", "tpu", "METAL", "mps")
TRAIN_AUTO = ("gpu", "tpu")  # Training goes to Metal only when asked by name.
LABELS = {"gpu": "GPU", "cuda": "GPU", "rocm": "GPU", "tpu": "TPU", "METAL": "Metal GPU",
          "mps": "Metal GPU (mps)"}
# Errors that mean "not installed here" rather than "installed but broken": jaxlib always
# registers a TPU backend, which fails without libtpu.
_ABSENT = ("Unknown backend", "no platforms that are instances", "Failed to open libtpu")
_JAX_HINT = " (set JAX_PLATFORMS='' to automatically choose an available backend)"


def _short(reason: str) -> str:
  return reason.replace(_JAX_HINT, "").strip().splitlines()[0][:200]


@functools.cache
def start_backends() -> dict:
  """Starts JAX's backends before anything else does. A platform listed in JAX_PLATFORMS
  that cannot start is dropped (JAX would raise); returns {platform: reason} for those."""
  failed = {}
  while True:
    try:
      jax.devices()
      return failed
    except RuntimeError as e:
      match = re.search(r"Unable to initialize backend '([^']+)': (.*)", str(e), re.S)
      listed = (jax.config.jax_platforms or "").split(",")
      if not match or match.group(1) not in listed or match.group(1) == "cpu":
        raise
      failed[match.group(1)] = _short(match.group(2))
      jax.config.update("jax_platforms", ",".join(p for p in listed
                                                  if p != match.group(1)) or "cpu")


def _problem(platform: str, failed: dict) -> tuple[bool, str | None]:
  """(installed, why unusable) for `platform`; (True, None) when it works."""
  if platform in failed:
    return True, failed[platform]
  try:
    device = jax.local_devices(backend=platform)[0]
  except RuntimeError as e:
    return not any(marker in str(e) for marker in _ABSENT), _short(str(e))
  if platform != "cpu":
    try:  # jax-metal on a too-new JAX starts, then fails every computation.
      jax.jit(lambda x: x + 1)(jax.device_put(np.ones(2, np.float32), device)).block_until_ready()
    except Exception as e:  # Plugins raise assorted types (XlaRuntimeError, RuntimeError...).
      return True, _short(str(e) or type(e).__name__)
  return True, None


def _choose(flag: str, value: str, auto_order, role: str, failed: dict, notes: list) -> str:
  """The platform for `role` (training or evaluation) from the flag's value; adds the
  header's line about it to `notes`."""
  on_cpu = {"training": "training on CPU", "evaluation": "evaluating on CPU"}[role]
  requested = CHOICES[value]
  for platform in auto_order if requested == "auto" else (requested,):
    if platform == "cpu":
      return "cpu"
    installed, problem = _problem(platform, failed)
    if problem is None:
      device = jax.local_devices(backend=platform)[0]
      notes.append(f"✓ {LABELS[platform]} enabled for {role}: {device.platform}:{device.id}")
      return platform
    if requested != "auto":
      notes.append(f"⚠ --{flag}={value}: {LABELS[platform]} not usable ({problem}); "
                   f"{on_cpu}")
      return "cpu"
    if installed:
      notes.append(f"⚠ {LABELS[platform]} backend `{platform}` failed ({problem}); {on_cpu}")
      return "cpu"
  if role == "evaluation":
    notes.append(f"⚠ No accelerator found: {on_cpu}")
  return "cpu"


@dataclasses.dataclass(frozen=True)
class Placement:
  train_devices: tuple  # The training mesh's devices, across all processes.
  eval_device: jax.Device  # One of this process's devices.
  notes: tuple[str, ...]  # The header's lines about the choice.

  @property
  def default_device(self) -> jax.Device:
    """Where work placed nowhere in particular should run: this process's first training
    device (for `jax.default_device`)."""
    return next(d for d in self.train_devices if d.process_index == jax.process_index())


def place(train_platform: str = "cpu", eval_platform: str = "auto",
          num_cpu_devices: int = 0) -> Placement:
  """The devices for training and the device for evaluation and generation, from the flag
  values. Training on the CPU uses its first `num_cpu_devices` devices (0: all of them; the
  command line makes exactly as many as it needs, a test process may have more)."""
  failed = start_backends()
  notes = []
  train = _choose("train_platform", train_platform, TRAIN_AUTO, "training", failed, notes)
  evaluation = _choose("eval_platform", eval_platform, EVAL_AUTO, "evaluation", failed, notes)
  train_devices = jax.devices(train)
  if train == "cpu" and num_cpu_devices and jax.process_count() == 1:
    train_devices = train_devices[:num_cpu_devices]
  return Placement(tuple(train_devices), jax.local_devices(backend=evaluation)[0],
                   tuple(notes))
