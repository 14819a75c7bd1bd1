"""Train a character-level GPT: `python -m randygpt.main --flagfile=experiments/shakespeare.cfg`."""

import os
import signal
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging

from randygpt import flags as randygpt_flags

flags.adopt_module_key_flags(randygpt_flags)  # --help lists randygpt's flags, not absl's.


def cache_dir() -> Path:
  """Caches that outlive runs: $RANDYGPT_CACHE, else $XDG_CACHE_HOME/randygpt or ~/.cache/randygpt."""
  if os.environ.get("RANDYGPT_CACHE"):
    return Path(os.environ["RANDYGPT_CACHE"])
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "randygpt"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = randygpt_flags.run_config()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # JAX's INFO lines about absent backends are noise.

  import jax  # After flag parsing: --help and flag errors stay fast.
  jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
  from randygpt import train
  from randygpt.errors import UserError

  try:
    summary = train.run(config)
  except UserError as e:
    sys.exit(f"Error: {e}")
  except KeyboardInterrupt:
    sys.exit(128 + signal.SIGINT)
  if "signal" in summary:
    # End by the signal itself, so that a shell loop running a sweep stops too.
    signal.signal(summary["signal"], signal.SIG_DFL)
    os.kill(os.getpid(), summary["signal"])


if __name__ == "__main__":
  app.run(main)
