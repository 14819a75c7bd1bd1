"""--time_budget (randygpt/trainer/budget.py): the iterations a duration buys, and a budget
run that a repeat from its flags.cfg, interrupted and resumed, follows bit for bit."""

import dataclasses
import json
import re
import shutil
import signal
import types

import numpy as np
import pytest

from randygpt import optim, trainer
from randygpt.config import TrainConfig
from randygpt.trainer import Trainer, budget

from conftest import parse_args, read_metrics, run_training, tiny, write_corpus

TC = TrainConfig(eval_interval=10, checkpoint_interval=20)


def test_the_iterations_are_the_most_whose_cost_fits():
  # 1 s a step, 5 s an evaluation, 1 s a save, 3 s for the final evaluation.
  def cost(n):
    evals = -(-n // 10)
    return n + 5 * evals + (-(-n // 20) + evals) + 3
  for budget_s in (4, 9, 10, 100, 1000, 1001.5):
    n = budget.iters_within(budget_s, 1.0, 5.0, 1.0, 3.0, TC)
    assert n == 1 or cost(n) <= budget_s, budget_s
    assert cost(n + 1) > budget_s, budget_s
  assert budget.iters_within(100, 1.0, 0.0, 0.0, 0.0, TC) == 100
  assert budget.iters_within(1, 10.0, 0.0, 0.0, 0.0, TC) == 1  # At least one.


def test_timing_runs_the_untimed_steps_then_stops_at_the_cap_or_the_share():
  seen = []

  def step_once(state, step):
    seen.append(step)
    return state + 1, {"loss": 0.0}
  state, timed, step_s = budget.time_steps(step_once, 0, budget_s=1e9)
  assert seen == list(range(1, budget.UNTIMED_STEPS + budget.TIMED_STEPS + 1))
  assert (state, timed) == (len(seen), budget.TIMED_STEPS) and step_s >= 0
  seen.clear()
  budget.time_steps(step_once, 0, budget_s=0.0)  # Every step is over a share of nothing.
  assert len(seen) == budget.UNTIMED_STEPS + budget.MIN_TIMED_STEPS


def test_processes_choose_from_the_same_numbers():
  def first_process(values):  # Process 0's: 0.5 s a step, 2 s an estimate (5 s compiling).
    assert values.shape == (4,)
    return np.array([0.5, 5.0, 2.0, 0.0])
  chosen = budget.choose("1m", 60.0, (20, 0.1), (1.0, 1.0), 0.0, 3, TC, agree=first_process)
  # The final evaluation: compiling (5 - 2 s) and three batches of half an estimate each.
  assert (chosen.step_s, chosen.eval_s, chosen.final_s) == (0.5, 2.0, 6.0)
  assert chosen.iters == budget.iters_within(60.0, 0.5, 2.0, 0.0, 6.0, TC)
  assert chosen.line().startswith(f"time budget 1m: {chosen.iters:,} iterations (calibrated "
                                  "on 20 steps, 500 ms/it, evaluation 2.0 s each")
  assert budget.details(None) == {} and budget.details(chosen)["time_budget"]["iters"] == (
      chosen.iters)


def test_the_decay_starts_when_the_steps_left_are_its_share_of_the_horizon():
  # 100 s for the loop, a quarter of the horizon for the decay, the first estimate's at 300.
  timer = budget.DecayTimer(100.0, 0.25, warmup=10, first_start=300)
  timer.begin(0, now=0.0)
  assert timer.horizon(5, now=0.5) is None  # In the warmup: the horizon does not matter.
  assert timer.horizon(70, now=70.0) is None  # 1 s a step: 30 more, a quarter of 100 is 25.
  assert timer.horizon(75, now=75.0) == 100  # 25 more: the decay starts with step 76.
  assert timer.pace(75, now=75.0) == 1.0
  assert timer.horizon(60, now=90.0) == 66  # Slower (1.5 s a step): 6 more of 66.
  fast = budget.DecayTimer(100.0, 0.25, warmup=10, first_start=300)
  fast.begin(0, now=0.0, overhead_s=10.0)  # A rebuild to come: 90 s for the steps.
  assert fast.horizon(299, now=29.9) is None and fast.horizon(300, now=30.0) == 900
  for step, horizon in ((10, 11), (37, 100), (75, 100), (299, 900), (4999, 5000)):
    tc = TrainConfig(lr_schedule="wsd", warmup_iters=10,
                     **budget.fixed_decay(step, horizon))
    assert optim.decay_start(tc) == step and tc.iters == tc.lr_decay_iters == horizon


def test_only_a_fresh_wsd_budget_run_with_its_horizon_open_fixes_the_decay_late():
  chosen = budget.choose("1m", 60.0, (20, 0.5), (1.0, 1.0), 0.0, 2, TC)
  wsd = dict(lr_schedule="wsd", warmup_iters=10, iters=100, lr_decay_iters=100)
  timer = budget.decay_timer(chosen, TrainConfig(**wsd))
  assert (timer.loop_s, timer.first_start, timer.decay_fraction) == (59.0, 80, 0.2)
  assert budget.decay_timer(None, TrainConfig(**wsd)) is None  # A resume, or a repeat.
  for other in (dict(lr_schedule="cosine"), dict(lr_decay_iters=90), dict(warmup_iters=90)):
    assert budget.decay_timer(chosen, TrainConfig(**(wsd | other))) is None, other


def test_the_loop_asks_the_timer_every_log_interval_steps():
  """Each asking is a collective in a multi-process run: not every step; but always where
  the step compiled for the first estimate (25) would start decaying."""
  asked = []

  class Recorded(budget.DecayTimer):
    def horizon(self, step, now):
      asked.append(step)
  timer = Recorded(loop_s=60.0, decay_fraction=0.2, warmup=5, first_start=25)
  loop = types.SimpleNamespace(decay_timer=timer, tc=TrainConfig(log_interval=10))
  assert not any(Trainer.fix_decay(loop, step) for step in range(1, 36))
  assert asked == [10, 20, 25, 30]


def assert_same_losses(run, first):
  """Every logged iteration of `run` has `first`'s losses and learning rate, bit for bit."""
  same = ("iter", "train_loss", "val_loss", "lr")
  assert ([{k: r.get(k) for k in same} for r in read_metrics(run)]
          == [{k: r.get(k) for k in same} for r in read_metrics(first)])


def repeat_interrupted_and_resumed(first, iters, tmp_path, capsys, monkeypatch):
  """Repeats the run in `first` from its flags.cfg, stopped as by Ctrl-C after iteration 12
  (the stop is read a step behind), resumed with the command it printed; checks that every
  loss is the first run's."""
  record = Trainer.record

  def record_then_stop(self, step, *args, **kwargs):
    record(self, step, *args, **kwargs)
    if step == 11:
      self.stop(signal.SIGINT)
  monkeypatch.setattr(Trainer, "record", record_then_stop)
  again = tmp_path / f"{first.name}-again"
  stopped = trainer.run(parse_args(f"--flagfile={first / 'flags.cfg'}", f"--workdir={again}"))
  assert (stopped["status"], stopped["iters"]) == ("interrupted", 12)
  monkeypatch.setattr(Trainer, "record", record)
  out = capsys.readouterr().out
  assert "Timing the train step" not in out and "Decay starts" not in out
  assert f"--resume --workdir={again} --iters={iters}" in out
  resumed = run_training(again, resume=True, iters=iters)  # The command it printed.
  assert resumed["status"] == "completed" and resumed["iters"] == iters
  assert_same_losses(again, first)
  assert resumed["final_val_full"] == json.loads((first / "summary.json").read_text())[
      "final_val_full"]


BUDGET_RUN = tiny(time_budget="2s", lr_decay_iters=0, eval_interval=25, log_interval=1,
                  checkpoint_interval=100)


@pytest.mark.slow
def test_a_repeat_from_flags_cfg_interrupted_and_resumed_gives_the_same_losses(
    tmp_path, capsys, monkeypatch):
  corpus = write_corpus(tmp_path / "c.txt")
  first = tmp_path / "first"
  summary = run_training(first, **BUDGET_RUN, data=corpus)  # Cosine: fixed before training.
  out, iters = capsys.readouterr().out, summary["iters"]
  assert summary["status"] == "completed" and iters > 15, iters  # Room for a stop at 12.
  assert re.search(rf"time budget 2s: {iters:,} iterations \(calibrated on \d+ steps", out)
  recorded = (first / "flags.cfg").read_text().splitlines()
  assert recorded[0].startswith(f"# --time_budget=2s chose --iters={iters} on its first start")
  assert f"--iters={iters}" in recorded and f"--lr_decay_iters={iters}" in recorded
  assert not [line for line in recorded if line.startswith("--time_budget")]
  repeat_interrupted_and_resumed(first, iters, tmp_path, capsys, monkeypatch)

  # The budget run resumed with its budget keeps its target: nothing is left to train.
  assert run_training(first, resume=True, time_budget="1h")["status"] == "nothing to train"
  assert (f"--time_budget=1h is not timed again on a resume: the run keeps the target of its "
          f"checkpoint, iteration {iters}." in capsys.readouterr().out)


class DecaysAfter20(budget.DecayTimer):
  """A DecayTimer whose loop runs out of time at iteration 20, with 20 steps left."""

  def horizon(self, step: int, now: float) -> int | None:
    return 40 if step >= 20 else None


@pytest.mark.slow
def test_a_wsd_budget_run_fixes_its_horizon_when_the_decay_starts(tmp_path, capsys,
                                                                   monkeypatch):
  """The decay starts where the timer says (its rule is tested above), before the first
  estimate's: the step is rebuilt for the horizon, flags.cfg and run.json record it, the
  latest checkpoint holds it at once (a killed run resumes to it), and a repeat from
  flags.cfg follows the run bit for bit."""
  make_timer = budget.decay_timer
  monkeypatch.setattr(budget, "decay_timer", lambda calibration, tc: make_timer(
      calibration, tc) and DecaysAfter20(**dataclasses.asdict(make_timer(calibration, tc))))
  first, killed, step = tmp_path / "wsd", tmp_path / "killed", Trainer.step

  def step_after_a_copy(self, number):  # The workdir as a kill before step 23 leaves it.
    if number == 23:
      self.check_saves(wait=True)
      shutil.copytree(self.setup.workdir, killed)
    return step(self, number)
  monkeypatch.setattr(Trainer, "step", step_after_a_copy)
  # The timer ends it at 40: a longer budget costs nothing, and leaves a loaded machine a
  # first estimate whose decay starts after the warmup.
  summary = run_training(first, **(BUDGET_RUN | dict(time_budget="30s")), lr_schedule="wsd",
                         decay_fraction=0.5, data=write_corpus(tmp_path / "c.txt"))
  monkeypatch.setattr(budget, "decay_timer", make_timer)
  monkeypatch.setattr(Trainer, "step", step)
  out = capsys.readouterr().out
  estimate = int(re.search(r"time budget 30s: ([\d,]+) iterations .*the horizon is fixed "
                           r"when the decay starts", out)[1].replace(",", ""))
  assert estimate > 60 and "Decay starts after iteration 20: target 40 iterations" in out
  assert (summary["status"], summary["iters"]) == ("completed", 40)
  recorded = (first / "flags.cfg").read_text().splitlines()
  assert recorded[0].startswith("# --time_budget=30s chose --iters=40 when its decay started "
                                f"after iteration 20 (") and f"first estimate {estimate})" in (
                                    recorded[0])
  config = parse_args(f"--flagfile={first / 'flags.cfg'}").train
  assert (config.iters, config.lr_decay_iters, optim.decay_start(config)) == (40, 40, 20)
  lrs = {r["iter"]: r["lr"] for r in read_metrics(first)}
  assert lrs[19] == lrs[21] > lrs[22] > lrs[40]  # Held to the decay's first update, then down.
  decay = json.loads((first / "run.json").read_text())["starts"][0]["decay_fixed"]
  assert (decay["after_iter"], decay["iters"]) == (20, 40)
  # The fix saved at once (--checkpoint_interval=100): the killed run resumes to its horizon.
  resumed = run_training(killed, resume=True)
  assert (resumed["status"], resumed["iters"]) == ("completed", 40)
  assert_same_losses(killed, first)
  repeat_interrupted_and_resumed(first, 40, tmp_path, capsys, monkeypatch)
