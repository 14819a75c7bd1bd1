"""How long an async checkpoint save blocks the training loop, and what it costs in all."""

import itertools
import tempfile
import time
from pathlib import Path

from randygpt.bench.timing import jax_block, percentile

SAVE_EVERY = 10  # Steps between timed checkpoint saves.


def measure_checkpoints(step, state, batch, saves: int) -> dict:
  """The time a save blocks the loop (its state computed), and the whole cost (background
  writing competes for the same cores) from timed runs with and without saves."""
  import jax

  from randygpt import checkpoint
  save_steps = itertools.count(1)

  def run_steps(state, n, checkpoints=None):
    blocked = []
    start = time.perf_counter()
    for i in range(n):
      state, _ = step(state, batch, jax.random.key(i))
      if checkpoints and i % SAVE_EVERY == 0:
        jax_block(state)
        blocked.append(checkpoints.save("latest", next(save_steps), state,
                                        {"format": checkpoint.FORMAT}))
    if checkpoints:
      checkpoints.wait()
    jax_block(state)
    return state, time.perf_counter() - start, blocked

  n_save_steps = SAVE_EVERY * saves
  with tempfile.TemporaryDirectory() as tmp:
    checkpoints = checkpoint.Checkpoints(Path(tmp))
    state, _, _ = run_steps(state, SAVE_EVERY, checkpoints)  # Creates the Orbax manager.
    state, with_saves_s, blocked = run_steps(state, n_save_steps, checkpoints)
    checkpoints.close()
  state, without_saves_s, _ = run_steps(state, n_save_steps)
  return {"save_ms": 1e3 * percentile(blocked, 50), "save_ms_max": 1e3 * max(blocked),
          "save_cost_ms": 1e3 * max(with_saves_s - without_saves_s, 0.0) / len(blocked)}


def measure_durability(state, rounds: int = 10) -> dict:
  """Each save's whole cost, from its start to its last byte on disk (save, then wait),
  with the fsyncs (durable) and without, alternating in the same sitting: ms by setting,
  the median and the worst."""
  from randygpt import checkpoint
  times = {True: [], False: []}
  with tempfile.TemporaryDirectory() as tmp:
    managers = {durable: checkpoint.Checkpoints(Path(tmp) / str(durable), durable=durable)
                for durable in times}
    for step in range(rounds + 1):  # The first save of each makes its manager: not timed.
      for durable, checkpoints in managers.items():
        start = time.perf_counter()
        checkpoints.save("latest", step, state, {"format": checkpoint.FORMAT})
        checkpoints.wait()
        if step:
          times[durable].append(1e3 * (time.perf_counter() - start))
    for checkpoints in managers.values():
      checkpoints.close()
  return {("durable" if durable else "orbax_only"): {
      "median_ms": percentile(ms, 50), "max_ms": max(ms)} for durable, ms in times.items()}
