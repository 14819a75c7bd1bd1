"""A training run in named stages: `prepare(config) -> Setup` (trainer/setup.py),
`Trainer(setup).loop()` and `finish(trainer, summary)` (trainer/loop.py).

`prepare` resolves everything fixed before the first step: where the run starts (fresh or
from a checkpoint), the text and its tokens, the devices, the initial state and the jitted
functions. The `Trainer` holds what changes as the run goes (the state, the best evaluation,
the records); its methods are what a researcher changes: `step`, `record`, `evaluate`,
`save`. `finish` prints where the checkpoints are and draws the samples.
"""

import contextlib
import functools
import time
from pathlib import Path

import jax

from randygpt import checkpoint
from randygpt.config import RunConfig
from randygpt.runtime import cli, devices, fallback, memory, platforms, rundir
from randygpt.trainer.loop import (Diverged, Trainer, TrainingDeviceFailed, finish,
                                   train_and_close)
from randygpt.trainer.setup import (Setup, build_step, compile_step, initial_state,
                                    place_batch, prepare, read_text, resolve, stream_key)


def run(config: RunConfig, place=platforms.place,
        executor: fallback.Executor = fallback.run_plainly) -> dict:
  """Trains as `config` says, writes the workdir, prints samples; returns the summary. The
  workdir is locked meanwhile: a second run on it is refused. `place` chooses the devices
  from the flags; `executor` runs the work sent to an accelerator (runtime/fallback.py)."""
  started, after_imports_mb = time.perf_counter(), memory.resident_mb()
  workdir = Path(config.location.workdir)
  stop = cli.StopRequest(functools.partial(abandon, workdir))
  with stop.installed(), rundir.claim(workdir, lock=devices.is_main_process()):
    setup = prepare(config, place, executor)
    if setup is None:
      return {"status": "nothing to train"}
    trainer = Trainer(setup, started, after_imports_mb, executor, stop)
    with jax.default_device(setup.plan.placement.default_device):
      return finish(trainer, train_and_close(trainer))


def abandon(workdir: Path) -> str:
  """A run left at once (a second Ctrl-C): summary.json says so; the sentence naming what
  it keeps."""
  with contextlib.suppress(Exception):  # Leaving matters more.
    rundir.mark_ended(workdir, "interrupted")
  newest = checkpoint.Checkpoints(workdir).newest()
  return (f"The last complete checkpoint is {newest}: resume with --resume." if newest
          else "No checkpoint was saved.")
