"""--time_budget: the iterations that a duration buys.

A fresh start times its train step (compiled for a provisional horizon, on a state that is
then discarded), one loss estimate, and one copy of the state to the host (what a save
blocks for), then takes the most iterations whose steps, evaluations, saves and final
evaluation fit the budget. A cosine schedule's horizon is fixed there. A warmup-stable-decay
one is fixed later, when its decay starts (`DecayTimer`), from the loop's own pace so far:
a machine drifts by 10-20% over a run (docs/measurements.md, "A search at equal wall
time"), which no timing before the first step sees. Either way the run is then exactly the
run of its flags.cfg, and a repeat from it or a resume trains the same steps with no
timing. Compiling and the timing before the first step are not in the budget.
"""

import dataclasses
import math
import time
from typing import Callable

import jax
import numpy as np

from randygpt import optim
from randygpt.config import TrainConfig

TIMED_STEPS = 20
UNTIMED_STEPS = 2  # The first steps after compiling run slower (allocations, caches).
# Timing stops early once its steps took this share of the budget (after MIN_TIMED_STEPS).
TIMING_SHARE, MIN_TIMED_STEPS = 0.05, 3


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What a --time_budget measured, and the iterations it chose."""
  budget: str
  budget_s: float
  steps: int  # The steps timed.
  step_s: float  # Seconds per step.
  eval_s: float  # One loss estimate (train and val).
  save_s: float  # A save's blocking part: the state copied to the host.
  final_s: float  # The final evaluation over the whole val split, from eval_s.
  iters: int
  decay_from_loop: bool = False  # A DecayTimer fixes the horizon when the decay starts.

  def line(self) -> str:
    """The header's line."""
    later = ("; a first estimate: the horizon is fixed when the decay starts, from the "
             "loop's pace" if self.decay_from_loop else "")
    return (f"time budget {self.budget}: {self.iters:,} iterations (calibrated on "
            f"{self.steps} steps, {1e3 * self.step_s:.0f} ms/it, evaluation "
            f"{self.eval_s:.1f} s each, save {self.save_s:.2f} s, final evaluation "
            f"{self.final_s:.1f} s{later})")

  def comment(self) -> str:
    """flags.cfg's note: the flags below train the same iterations without timing."""
    timed = f"({1e3 * self.step_s:.0f} ms/it, evaluation {self.eval_s:.1f} s each)"
    if self.decay_from_loop:
      return (f"--time_budget={self.budget} estimated --iters={self.iters} on its first start "
              f"{timed}; the run fixes it when its decay starts and rewrites this file then.")
    return (f"--time_budget={self.budget} chose --iters={self.iters} on its first start "
            f"{timed}: a repeat from this file trains as many, without timing.")

  def fixed_comment(self, step: int, horizon: int, pace_s: float) -> str:
    """flags.cfg's note once a DecayTimer fixed the horizon."""
    return (f"--time_budget={self.budget} chose --iters={horizon} when its decay started "
            f"after iteration {step} ({1e3 * pace_s:.0f} ms/it in the loop, evaluations and "
            f"saves included; first estimate {self.iters}): a repeat from this file trains "
            "as many, without timing.")


def iters_within(budget_s: float, step_s: float, eval_s: float, save_s: float,
                 final_s: float, tc: TrainConfig) -> int:
  """The most iterations (at least 1) whose steps, evaluations (every --eval_interval and at
  the end), saves (the latest every --checkpoint_interval and at the end, the best after up
  to every evaluation) and final evaluation take at most `budget_s` seconds."""
  def cost(n: int) -> float:
    evals = math.ceil(n / tc.eval_interval)
    saves = math.ceil(n / tc.checkpoint_interval) + evals
    return n * step_s + evals * eval_s + saves * save_s + final_s
  low, high = 1, max(1, int(budget_s / max(step_s, 1e-9)) + 1)
  while low < high:  # The cost grows with n: the largest n within the budget.
    mid = (low + high + 1) // 2
    low, high = (mid, high) if cost(mid) <= budget_s else (low, mid - 1)
  return low


def time_steps(step_once: Callable, state, budget_s: float):
  """Runs UNTIMED_STEPS, then up to TIMED_STEPS timed ones, of `step_once(state, step) ->
  (state, metrics)` from step 1; returns the last state, the steps timed and the seconds
  per step. Each step is waited for: the loop overlaps Python with the device, so this
  errs long."""
  for step in range(1, UNTIMED_STEPS + 1):
    state, step_metrics = step_once(state, step)
  jax.block_until_ready(step_metrics)
  start, timed = time.perf_counter(), 0
  while timed < TIMED_STEPS:
    timed += 1
    state, step_metrics = step_once(state, UNTIMED_STEPS + timed)
    jax.block_until_ready(step_metrics)
    if timed >= MIN_TIMED_STEPS and time.perf_counter() - start > TIMING_SHARE * budget_s:
      break
  return state, timed, (time.perf_counter() - start) / timed


def seconds_of(work: Callable) -> float:
  """The seconds `work()` takes, its result waited for."""
  start = time.perf_counter()
  jax.block_until_ready(work())
  return time.perf_counter() - start


def choose(budget: str, budget_s: float, timed: tuple[int, float], evals: tuple[float, float],
           save_s: float, final_batches: int, tc: TrainConfig,
           agree: Callable = lambda values: values) -> Calibration:
  """The Calibration of these measurements: `evals` an estimate's seconds the first time
  (compiling it) and the second, `final_batches` the final evaluation's batches (half an
  estimate each, and a compile like the estimate's); `agree` makes every process take
  process 0's numbers."""
  steps, step_s = timed
  step_s, first_s, eval_s, save_s = (
      float(x) for x in agree(np.array([step_s, *evals, save_s])))
  final_s = max(first_s - eval_s, 0.0) + eval_s / 2 * final_batches
  iters = iters_within(budget_s, step_s, eval_s, save_s, final_s, tc)
  return Calibration(budget, budget_s, steps, step_s, eval_s, save_s, final_s, iters)


@dataclasses.dataclass
class DecayTimer:
  """When a --time_budget run with --lr_schedule=wsd starts its decay, and its horizon.

  The stable phase's learning rate does not depend on the horizon, so it is fixed as late
  as the decay allows: every few steps past the warmup, the loop's pace so far (evaluations
  and saves included) says how many more steps fit what is left of the budget; when those
  are no more than the decay's share of the horizon, or the step compiled for the first
  estimate would start decaying, the decay starts with the next step."""
  loop_s: float  # The budget less the final evaluation: the loop's seconds.
  decay_fraction: float
  warmup: int
  first_start: int  # decay_start of the first estimate: where the compiled step decays.
  started: float = 0.0  # perf_counter when the loop's first step began.
  start_iter: int = 0

  def begin(self, start_iter: int, now: float, overhead_s: float = 0.0) -> None:
    """The loop starts at `start_iter`, at `now`; `overhead_s` more (building the step for
    the fixed horizon) will be spent before the end."""
    self.start_iter, self.started = start_iter, now
    self.loop_s -= overhead_s

  def pace(self, step: int, now: float) -> float:
    """The loop's seconds per step so far, after `step`."""
    return (now - self.started) / max(step - self.start_iter, 1)

  def asks(self, step: int, every: int) -> bool:
    """Whether the loop asks for the horizon after `step`, asking every `every` steps: also
    where the compiled step would start decaying, so that it never decays unasked."""
    return step % every == 0 or step == self.first_start

  def horizon(self, step: int, now: float) -> int | None:
    """After `step`: the horizon to fix if the decay must start with the next step."""
    if step < self.warmup:
      return None
    left = self.loop_s - (now - self.started)
    more = max(int(left / max(self.pace(step, now), 1e-9)), 1)
    if more <= max(1, round(self.decay_fraction * (step + more))) or step >= self.first_start:
      return step + more
    return None


def decay_timer(calibration: Calibration | None, tc: TrainConfig) -> DecayTimer | None:
  """The DecayTimer of a fresh --time_budget start with --lr_schedule=wsd and no
  --lr_decay_iters (None otherwise, or when its first estimate decays within the warmup)."""
  if (calibration is None or tc.lr_schedule != "wsd" or tc.lr_decay_iters != tc.iters
      or optim.decay_start(tc) <= tc.warmup_iters):
    return None
  return DecayTimer(calibration.budget_s - calibration.final_s, tc.decay_fraction,
                    tc.warmup_iters, optim.decay_start(tc))


def fixed_decay(step: int, horizon: int) -> dict:
  """The TrainConfig fields of a warmup-stable-decay run whose decay starts after `step` (at
  least the warmup) and ends at `horizon`: optim.decay_start gives `step` back."""
  return {"iters": horizon, "lr_decay_iters": horizon,
          "decay_fraction": (horizon - step) / horizon}


def details(calibration: Calibration | None) -> dict:
  """What run.json records of a start's calibration (nothing without one)."""
  return {} if calibration is None else {"time_budget": dataclasses.asdict(calibration)}
