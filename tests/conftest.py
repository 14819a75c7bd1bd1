"""Shared fixtures and helpers: small corpora, unjitted runs, the tiny run's flags,
training and sampling in this process, a trained run to copy, and the subprocess runner for
what only a process boundary shows (signals, exit statuses, stderr, locks, the launcher)."""

import contextlib
import dataclasses
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest
from absl import flags as absl_flags
from absl.testing import flagsaver

from randygpt.data import KNOWN_DATASETS
from randygpt.runtime import devices

# Two CPU devices, fixed when JAX starts its backends (below): in-process runs train
# data-parallel as the command line does on two cores, and tests can compare 1 and 2.
devices.set_cpu_device_count(2)

# The suite's time goes to compiling many small programs, not to running them. Two XLA
# settings cut it (docs/measurements.md, "Test suite"): no LLVM optimisations (the programs
# then run about half as fast, and compute the same) and the older elementwise emitters (a
# small program compiles in ~60% of the time). A jaxlib that does not know a flag aborts at
# start (the pinned 0.5.0 knows only the first), so the second is kept only where a probe
# process starts with it. Set before JAX starts its backends; pytest-xdist's workers and the
# processes the tests start inherit the choice. RANDYGPT_TEST_XLA_FLAGS="" keeps XLA's
# defaults.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _starts_with(xla_flags: list[str]) -> bool:
  start_jax = "import jax; jax.numpy.zeros(1).block_until_ready()"
  return subprocess.run([sys.executable, "-c", start_jax], capture_output=True,
                        env={**os.environ, "XLA_FLAGS": " ".join(xla_flags)}).returncode == 0


if "RANDYGPT_TEST_XLA_FLAGS" not in os.environ:
  _user_flags = os.environ.get("XLA_FLAGS", "").split()
  os.environ["RANDYGPT_TEST_XLA_FLAGS"] = " ".join(
      FAST_COMPILE_FLAGS if _starts_with(_user_flags + list(FAST_COMPILE_FLAGS))
      else FAST_COMPILE_FLAGS[:1])
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(  # Once each, in a worker as in the controller.
    os.environ.get("XLA_FLAGS", "").split() + os.environ["RANDYGPT_TEST_XLA_FLAGS"].split()))

REPO = Path(__file__).resolve().parent.parent


def find_shakespeare(places: tuple[Path, ...]) -> tuple[Path, str]:
  """The first of `places` holding Tiny Shakespeare, checked by size and SHA-256 as a download
  is; else the first place and why the tests that need it are skipped."""
  known = KNOWN_DATASETS["tinyshakespeare.txt"]
  for place in places:
    if (place.is_file() and place.stat().st_size == known.size
        and hashlib.sha256(place.read_bytes()).hexdigest() == known.sha256):
      return place, ""
  elsewhere = "".join(f" nor {place}" for place in places[1:])
  return places[0], (f"Tiny Shakespeare is not in {places[0]}{elsewhere}: "
                     "./launch.sh experiments/shakespeare.cfg downloads it there")


# data/ is where the quick start downloads it; ../shared/data is a development machine's copy.
SHAKESPEARE, _NO_SHAKESPEARE = find_shakespeare((
    REPO / "data" / "tinyshakespeare.txt",
    REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))

needs_shakespeare = pytest.mark.skipif(bool(_NO_SHAKESPEARE), reason=_NO_SHAKESPEARE)


# Tests compare code paths to float32 tolerance; GPUs would otherwise multiply in TF32.
jax.config.update("jax_default_matmul_precision", "highest")

# One compilation cache for the session, new each time, kept for every compilation: runs in
# this process build their jitted functions anew (as a process would), and the many runs of
# the same tiny shape then compile once. pytest-xdist's workers share it (their run's id names
# it), and so do the CLI runs below (RANDYGPT_CACHE).
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
SESSION_CACHE = (Path(tempfile.gettempdir()) / f"randygpt-tests-{_RUN_ID}" if _RUN_ID
                 else Path(tempfile.mkdtemp(prefix="randygpt-tests-")))
SESSION_CACHE.mkdir(exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(SESSION_CACHE / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

# A suite started in the background by a shell without job control inherits SIGINT ignored,
# and so would the CLI runs whose Ctrl-C handling tests check: a handled signal is reset to
# the default in a child, an ignored one stays ignored.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)


# The platforms of accelerators, as JAX and its plugins name them (jax-metal: METAL; the
# community jax-mps: mps), and None for JAX's default devices (a plugin of another name).
ACCELERATOR_PLATFORMS = ("gpu", "cuda", "rocm", "tpu", "METAL", "mps", None)


def accelerator_platforms(devices_of=jax.devices) -> list[str]:
  """The platforms of the non-CPU devices here. `devices_of(name)` lists a platform's
  devices and raises RuntimeError for one that is absent or cannot start (jax.devices; a
  test gives a fake list)."""
  found = set()
  for name in ACCELERATOR_PLATFORMS:
    try:
      found |= {d.platform for d in devices_of(name)}
    except RuntimeError:
      continue
  return sorted(p for p in found if p.lower() != "cpu")


ACCELERATORS = accelerator_platforms()
needs_gpu = pytest.mark.skipif("gpu" not in ACCELERATORS, reason="no GPU here")
without_accelerator = pytest.mark.skipif(
    bool(ACCELERATORS), reason=f"asserts the fallback, and an accelerator is here: {ACCELERATORS}")

# Work a test places nowhere in particular runs on the CPU, as the tests' numbers assume,
# also where an accelerator (e.g. Metal) would be JAX's default. Runs set their own devices.
jax.config.update("jax_default_device", jax.devices("cpu")[0])


def pytest_unconfigure(config):
  if not os.environ.get("PYTEST_XDIST_WORKER"):  # The last to end: the run, not a worker.
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


# Corpora.

def make_corpus(n_chars: int = 6000) -> str:
  """A deterministic text with some structure to learn, including non-ASCII characters."""
  lines = [f"{name}: the {thing} is {mood} today, {n} times over; né façon ünd ẞ."
           for n, (name, thing, mood) in enumerate(
               (("ANNA", "river", "quiet"), ("BORIS", "kettle", "loud"),
                ("CLARA", "garden", "green"), ("DMITRI", "window", "open")) * 500)]
  return "\n".join(lines)[:n_chars]


def write_corpus(path: Path, n_chars: int = 6000) -> Path:
  """make_corpus(n_chars) written to `path`; returns `path`."""
  path.write_text(make_corpus(n_chars), encoding="utf-8")
  return path


@pytest.fixture
def corpus_file(tmp_path) -> Path:
  return write_corpus(tmp_path / "corpus.txt")


def unjitted(fn):
  """`fn` run under `jax.disable_jit()`: its jits run eagerly and every `lax.scan`, `lax.map`
  and `fori_loop` as a Python loop, op by op (calling a function without `jax.jit` is not
  that: its scans still compile as one XLA computation). Slow to run: a few smoke tests
  compare it with jitted runs, for tracing differences; the numbers themselves are checked
  against the float64 reference (tests/reference.py)."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.disable_jit():
      return fn(*args, **kwargs)
  return run


# Runs in this process.

# The tiny run most tests train: one shape, one optimizer schedule (the decay horizon is
# fixed, so that runs of any --iters share their compiled train step), small estimates and
# samples, evaluated on the CPU whatever accelerator is here (the tests that use one, or
# its absence, ask for it). Runs that differ in these compile their own.
TINY = {"n_embd": 32, "n_head": 4, "n_layer": 1, "block_size": 16, "batch_size": 4,
        "eval_iters": 2, "max_new_tokens": 20, "warmup_iters": 10, "lr_decay_iters": 40,
        "eval_platform": "cpu"}


def tiny(**values) -> dict:
  """TINY with these flags added or changed."""
  return {**TINY, **values}


def as_args(values: dict) -> list[str]:
  """Flags as command-line arguments: {"iters": 4} -> ["--iters=4"]."""
  return [f"--{name}={value}" for name, value in values.items()]


def run_config(**values):
  """The RunConfig of these flag values, each as if given on the command line."""
  from randygpt.config import RunConfig
  if "prompt" in values:
    prompt = values["prompt"]
    values["prompt"] = (prompt,) if isinstance(prompt, str) else tuple(prompt)
  values = {name: str(v) if isinstance(v, Path) else v for name, v in values.items()}
  return RunConfig.from_flags(values, explicit=set(values))


def run_training(workdir, **values) -> dict:
  """`python -m randygpt.main --workdir=workdir --name=value...` in this process: the run's
  summary (with "signal" when one stopped it); a user's mistake raises its UserError."""
  from randygpt import trainer
  return trainer.run(run_config(workdir=workdir, **values))


@contextlib.contextmanager
def parsed_flags(*args: str):
  """absl's flags parsed from `args` (as a command line, flag files included) while the
  block runs, then restored."""
  flag_values = absl_flags.FLAGS
  with flagsaver.flagsaver():
    flag_values.unparse_flags()
    try:
      flag_values(["randygpt", *map(str, args)])
      yield flag_values
    finally:
      flag_values.unparse_flags()


def parse_args(*args: str):
  """The RunConfig that these command-line arguments give, as randygpt.main builds it."""
  from randygpt import flags as randygpt_flags
  with parsed_flags(*args):
    return randygpt_flags.run_config()


def sample_in_process(*args: str, place=None, executor=None) -> None:
  """`python -m randygpt.sample args...` in this process (its samples go to stdout), on the
  CPU unless an --eval_platform is given; `place` and `executor` as sample_from_checkpoint's."""
  from randygpt import flags as randygpt_flags
  from randygpt import sample
  if not any(arg.startswith("--eval_platform=") for arg in args):
    args = (*args, "--eval_platform=cpu")  # As the runs it samples from (TINY).
  with parsed_flags(*args) as flag_values:
    sample.sample_from_checkpoint(flag_values.checkpoint, randygpt_flags.run_config(), place,
                                  executor)


@contextlib.contextmanager
def raises_user_error(message: str):
  """Expects a UserError whose message holds `message` and is one line (the CLI prints it
  as `Error: <message>`)."""
  from randygpt.errors import UserError
  with pytest.raises(UserError) as info:
    yield info
  assert message in str(info.value), str(info.value)
  assert "\n" not in str(info.value), str(info.value)


def restored_state(workdir: Path, kind: str = "latest") -> dict:
  """The train state {params, opt} of a workdir's latest or best checkpoint, on one device."""
  from randygpt import checkpoint
  from randygpt.config import RunConfig
  path = checkpoint.Checkpoints(workdir).path(kind)
  meta = checkpoint.read_meta(path)
  saved = RunConfig.from_flags(meta["config"])
  model_config = dataclasses.replace(saved.model, vocab_size=len(meta["vocab"]))
  return checkpoint.restore_train_state(
      path, model_config, saved.train, jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))


def read_metrics(workdir: Path) -> list[dict]:
  import json
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def truncate_data_files(checkpoint_path: Path) -> None:
  """Cuts every data file of a checkpoint's state short: a checkpoint a crash broke."""
  for f in (checkpoint_path / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:50])


def tree_bytes(path: Path) -> dict:
  """Every file under `path` and its content, but the workdir lock (which names the last
  process that held it): equal before and after means nothing was changed."""
  return {p: p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file() and p.name != "run.lock"}


# The run that tests which need a trained workdir copy: TINY on make_corpus() for 20
# iterations, evaluated at 10 and 20, with latest and best checkpoints at 20.
TRAINED = {**TINY, "data": "c.txt", "iters": 20, "eval_interval": 10, "log_interval": 5,
           "checkpoint_interval": 10, "prompt": ("ANNA:", "né"), "max_new_tokens": 30,
           "seed": 5}


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory):
  """A folder holding c.txt and the workdir w of a TRAINED run, trained from that folder
  (so its flags and paths are relative, as a user's would be)."""
  root = tmp_path_factory.mktemp("trained")
  write_corpus(root / "c.txt")
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(root)
    summary = run_training("w", **TRAINED)
  assert summary["status"] == "completed" and summary["best_iter"] == 20, summary
  return root


@pytest.fixture
def trained(trained_once, tmp_path, monkeypatch):
  """A copy of the trained run in tmp_path, the current directory: c.txt and the workdir w;
  returns the workdir."""
  shutil.copytree(trained_once, tmp_path, dirs_exist_ok=True)
  monkeypatch.chdir(tmp_path)
  return tmp_path / "w"


# Runs in a subprocess.

@pytest.fixture(scope="session")
def cli_env():
  env = dict(os.environ)
  env["RANDYGPT_CACHE"] = str(SESSION_CACHE)
  env["PYTHONPATH"] = str(REPO)
  # As in this process: the same products, and every compilation cached (and shared).
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env.pop("JAX_PLATFORMS", None)
  return env


@pytest.fixture
def run_cli(cli_env, tmp_path):
  """Runs `python -m <module> args...` in tmp_path, through `wrapper` (a command that runs
  the rest) when given; returns the CompletedProcess."""
  def run(*args, module="randygpt.main", timeout=600, env=None, wrapper=()):
    return subprocess.run([*wrapper, sys.executable, "-m", module, *map(str, args)],
                          cwd=tmp_path, env={**cli_env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
  return run


@pytest.fixture
def start_cli(cli_env, tmp_path):
  """Starts `python -m <module> args...` in tmp_path; returns the Popen (text pipes)."""
  def start(*args, module="randygpt.main", env=None):
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=tmp_path,
                            env={**cli_env, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return start


def wait_for(proc, text: str) -> str:
  """Reads the process's stdout until `text` appears (it may end without a newline);
  returns what it read."""
  seen = ""
  while text not in seen:
    char = proc.stdout.read(1)
    if not char:
      raise AssertionError(f"{text!r} never printed; stdout: {seen}; "
                           f"stderr: {proc.stderr.read()}")
    seen += char
  return seen


def assert_clean_error(result, message: str) -> None:
  """A CLI's refusal: exit status 1, and stderr one `Error: ...` line holding `message`."""
  assert result.returncode == 1, (result.returncode, result.stderr)
  assert "Traceback" not in result.stderr, result.stderr
  assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
  assert message in result.stderr, result.stderr
