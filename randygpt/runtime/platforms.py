"""Which devices train, and which estimate losses and generate.

Training runs on the CPU devices unless asked otherwise, as in randyGPT; evaluation and
generation run on the first accelerator that works (a CUDA/ROCm GPU, a TPU, Apple's GPU
through jax-metal or the community `mps` plugin), else on the CPU. An accelerator whose
backend fails to start, or fails its first computation, is dropped with one warning line
and the CPU takes its part: never a traceback. (An evaluation device that fails later is
the Evaluator's to handle: randygpt/evaluate.py.)
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
# Apple's GPU, through jax-metal or jax-mps: one device, no collectives, no sharding; it
# trains one process's model alone.
ONE_DEVICE = ("METAL", "mps")
LABELS = {"gpu": "GPU", "cuda": "GPU", "rocm": "GPU", "tpu": "TPU", "METAL": "Metal GPU",
          "mps": "Metal GPU (mps)", "cpu": "CPU"}
# Errors that mean "not installed here" rather than "installed but broken": jaxlib always
# registers a TPU backend, which fails without libtpu.
_ABSENT = ("Unknown backend", "no platforms that are instances", "Failed to open libtpu")
_JAX_HINT = " (set JAX_PLATFORMS='' to automatically choose an available backend)"


def short(reason: str) -> str:
  """An error's first line, for a one-line message."""
  return (reason.replace(_JAX_HINT, "").strip() or "(no message)").splitlines()[0][:200]


def error_line(error: BaseException) -> str:
  return short(str(error) or type(error).__name__)


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
      failed[match.group(1)] = short(match.group(2))
      jax.config.update("jax_platforms", ",".join(p for p in listed
                                                  if p != match.group(1)) or "cpu")


def _problem(platform: str, failed: dict) -> tuple[bool, str | None]:
  """(installed, why unusable) for `platform`; (True, None) when it works."""
  if platform in failed:
    return True, failed[platform]
  try:
    device = jax.local_devices(backend=platform)[0]
  except RuntimeError as e:
    return not any(marker in str(e) for marker in _ABSENT), short(str(e))
  if platform != "cpu":
    try:  # jax-metal on a too-new JAX starts, then fails every computation.
      jax.jit(lambda x: x + 1)(jax.device_put(np.ones(2, np.float32), device)).block_until_ready()
    except Exception as e:  # Plugins raise assorted types (XlaRuntimeError, RuntimeError...).
      return True, error_line(e)
  return True, None


def _on_cpu(role: str) -> str:
  return {"training": "training on CPU", "evaluation": "evaluating on CPU"}[role]


def enabled(device: jax.Device, role: str, platform: str | None = None) -> str:
  """The header's line for `device`, of `platform` (default: the device's own)."""
  platform = platform or device.platform
  return f"✓ {LABELS.get(platform, platform)} enabled for {role}: {platform}:{device.id}"


def device_name(device: jax.Device, platform: str | None = None) -> str:
  """E.g. `GPU (gpu:0)`, for `device` of `platform` (default: the device's own)."""
  platform = platform or device.platform
  return f"{LABELS.get(platform, platform)} ({platform}:{device.id})"


def _unusable(flag: str, value: str, platform: str, role: str, problem: str) -> str:
  """The header's warning for an accelerator dropped for `role`."""
  label = LABELS.get(platform, platform)
  if CHOICES[value] != "auto":
    return f"⚠ --{flag}={value}: {label} not usable ({problem}); {_on_cpu(role)}"
  return f"⚠ {label} backend `{platform}` failed ({problem}); {_on_cpu(role)}"


def _choose(flag: str, value: str, auto_order, role: str, failed: dict, notes: list) -> str:
  """The platform for `role` (training or evaluation) from the flag's value; adds the
  header's line about it to `notes`."""
  requested = CHOICES[value]
  for platform in auto_order if requested == "auto" else (requested,):
    if platform == "cpu":
      return "cpu"
    installed, problem = _problem(platform, failed)
    if problem is None:
      notes.append(enabled(jax.local_devices(backend=platform)[0], role))
      return platform
    if requested != "auto" or installed:
      notes.append(_unusable(flag, value, platform, role, problem))
      return "cpu"
  if role == "evaluation":
    notes.append(f"⚠ No accelerator found: {_on_cpu(role)}")
  return "cpu"


@dataclasses.dataclass(frozen=True)
class Placement:
  train_devices: tuple  # The training mesh's devices, across all processes.
  eval_device: jax.Device  # One of this process's devices.
  train_notes: tuple[str, ...] = ()  # The header's lines about each choice.
  eval_notes: tuple[str, ...] = ()
  eval_flag: str = "auto"  # --eval_platform's value.
  # Whether training has a CPU to fall back to (a test may say so of CPU devices).
  train_on_accelerator: bool = False
  # The JAX platforms of the training devices and of the evaluation device ("cpu", "gpu",
  # "METAL", "mps"...): the devices' own when not given (a test may name a CPU device that
  # stands in for a plugin's).
  train_platform: str = ""
  eval_platform: str = ""

  def __post_init__(self):
    for field, device in (("train_platform", self.train_devices[0]),
                          ("eval_platform", self.eval_device)):
      if not getattr(self, field):
        object.__setattr__(self, field, device.platform)

  @property
  def notes(self) -> tuple[str, ...]:
    return self.train_notes + self.eval_notes

  def eval_on_cpu(self, problem: str) -> "Placement":
    """This placement with evaluation on the CPU: its accelerator failed the start-up probe,
    for `problem`. The header's line about it says so, as for one that failed to start."""
    warning = _unusable("eval_platform", self.eval_flag, self.eval_platform, "evaluation",
                        problem)
    return dataclasses.replace(self, eval_device=cpu_device(), eval_notes=(warning,),
                               eval_platform="cpu")

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
  train_notes, eval_notes = [], []
  train = _choose("train_platform", train_platform, TRAIN_AUTO, "training", failed,
                  train_notes)
  evaluation = _choose("eval_platform", eval_platform, EVAL_AUTO, "evaluation", failed,
                       eval_notes)
  train_devices = jax.devices(train)
  if train == "cpu" and num_cpu_devices and jax.process_count() == 1:
    train_devices = train_devices[:num_cpu_devices]
  eval_device = jax.local_devices(backend=evaluation)[0]
  return Placement(tuple(train_devices), eval_device, tuple(train_notes), tuple(eval_notes),
                   eval_platform, train_devices[0].platform != "cpu")


def cpu_device() -> jax.Device:
  """This process's first CPU device: where evaluation goes when an accelerator fails, and
  work placed nowhere in particular runs."""
  start_backends()  # Once: a listed backend that cannot start is dropped, not raised.
  return jax.local_devices(backend="cpu")[0]


def is_out_of_memory(error: BaseException) -> bool:
  return any(marker in str(error) for marker in ("RESOURCE_EXHAUSTED", "Out of memory",
                                                 "out of memory"))
