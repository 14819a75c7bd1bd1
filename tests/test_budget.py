"""--time_budget (randygpt/trainer/budget.py): the iterations a duration buys, and a budget
run that a repeat from its flags.cfg, interrupted and resumed, follows bit for bit."""

import re
import signal

import numpy as np
import pytest

from randygpt import trainer
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


@pytest.mark.slow
def test_a_repeat_from_flags_cfg_interrupted_and_resumed_gives_the_same_losses(
    tmp_path, capsys, monkeypatch):
  corpus = write_corpus(tmp_path / "c.txt")
  first = tmp_path / "first"
  summary = run_training(first, **tiny(data=corpus, time_budget="2s", lr_decay_iters=0,
                                       lr_schedule="wsd", eval_interval=25, log_interval=1,
                                       checkpoint_interval=100))
  out, iters = capsys.readouterr().out, summary["iters"]
  assert summary["status"] == "completed" and iters > 15, iters  # Room for a stop at 12.
  assert re.search(rf"time budget 2s: {iters:,} iterations \(calibrated on \d+ steps", out)
  recorded = (first / "flags.cfg").read_text().splitlines()
  assert recorded[0].startswith(f"# --time_budget=2s chose --iters={iters} on its first start")
  assert f"--iters={iters}" in recorded and f"--lr_decay_iters={iters}" in recorded
  assert not [line for line in recorded if line.startswith("--time_budget")]

  # The repeat, stopped as by Ctrl-C after iteration 12 (the stop is read a step behind).
  record = Trainer.record

  def record_then_stop(self, step, *args, **kwargs):
    record(self, step, *args, **kwargs)
    if step == 11:
      self.stop(signal.SIGINT)
  monkeypatch.setattr(Trainer, "record", record_then_stop)
  again = tmp_path / "again"
  stopped = trainer.run(parse_args(f"--flagfile={first / 'flags.cfg'}", f"--workdir={again}"))
  assert (stopped["status"], stopped["iters"]) == ("interrupted", 12)
  monkeypatch.setattr(Trainer, "record", record)
  out = capsys.readouterr().out
  assert "Timing the train step" not in out and f"--resume --workdir={again} --iters={iters}" in out
  resumed = run_training(again, resume=True, iters=iters)  # The command it printed.
  assert resumed["status"] == "completed" and resumed["iters"] == iters

  same = ("iter", "train_loss", "val_loss", "lr")
  assert ([{k: r.get(k) for k in same} for r in read_metrics(again)]
          == [{k: r.get(k) for k in same} for r in read_metrics(first)])
  assert resumed["final_val_full"] == summary["final_val_full"]

  # The budget run resumed with its budget keeps its target: nothing is left to train.
  assert run_training(first, resume=True, time_budget="1h")["status"] == "nothing to train"
  assert (f"--time_budget=1h is not timed again on a resume: the run keeps the target of its "
          f"checkpoint, iteration {iters}." in capsys.readouterr().out)
