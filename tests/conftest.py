"""Shared fixtures: small corpora, the unjitted reference, and the CLI runner."""

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from randygpt.runtime import devices

# Two CPU devices, fixed when JAX starts its backends (below): in-process runs train
# data-parallel as the command line does on two cores, and tests can compare 1 and 2.
devices.set_cpu_device_count(2)

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.exists(), reason=f"Tiny Shakespeare not found at {SHAKESPEARE}")


# Tests compare code paths to float32 tolerance; GPUs would otherwise multiply in TF32.
jax.config.update("jax_default_matmul_precision", "highest")

# A suite started in the background by a shell without job control inherits SIGINT ignored,
# and so would the CLI runs whose Ctrl-C handling tests check: a handled signal is reset to
# the default in a child, an ignored one stays ignored.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


HAS_GPU = _has_gpu()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no GPU here")
without_gpu = pytest.mark.skipif(HAS_GPU, reason="asserts the fallback, and a GPU is here")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end cases (deselect with -m 'not slow')")


def make_corpus(n_chars: int = 6000) -> str:
  """A deterministic text with some structure to learn, including non-ASCII characters."""
  lines = [f"{name}: the {thing} is {mood} today, {n} times over; né façon ünd ẞ."
           for n, (name, thing, mood) in enumerate(
               (("ANNA", "river", "quiet"), ("BORIS", "kettle", "loud"),
                ("CLARA", "garden", "green"), ("DMITRI", "window", "open")) * 500)]
  return "\n".join(lines)[:n_chars]


@pytest.fixture
def corpus_file(tmp_path) -> Path:
  path = tmp_path / "corpus.txt"
  path.write_text(make_corpus(), encoding="utf-8")
  return path


def unjitted(fn):
  """`fn` run under `jax.disable_jit()`: its jits run eagerly and every `lax.scan`, `lax.map`
  and `fori_loop` as a Python loop, op by op. The reference that jitted paths are compared
  with: calling a function without `jax.jit` is not it, as its scans still compile as one
  XLA computation."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.disable_jit():
      return fn(*args, **kwargs)
  return run


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
  env = dict(os.environ)
  env["RANDYGPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  env.pop("JAX_PLATFORMS", None)
  return env


@pytest.fixture
def run_cli(cli_env, tmp_path):
  """Runs `python -m <module> args...` in tmp_path, through `wrapper` (a command that runs
  the rest) when given; returns the CompletedProcess."""
  def run(*args, module="randygpt.main", timeout=600, env=None, wrapper=()):
    return subprocess.run([*wrapper, sys.executable, "-m", module, *map(str, args)],
                          cwd=tmp_path,
                          env={**cli_env, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
  return run
