"""A run's second and last stages: the `Trainer` (the state as the run goes, and what happens
at each step: `step`, `record`, `evaluate`, `save`), then `finish`: where the checkpoints
are, the samples, how to go on.
"""

import contextlib
import dataclasses
import signal
import time

import jax
import numpy as np

from randygpt import checkpoint, metrics, model, optim, train
from randygpt.errors import UserError
from randygpt.runtime import cli, devices, fallback, memory, platforms, rundir
from randygpt.trainer import budget
from randygpt.trainer.setup import Setup, compile_step, jit_step, place_batch, stream_key


class Diverged(UserError):
  """The loss or the weights stopped being finite."""


class TrainingDeviceFailed(UserError):
  """The accelerator that trains failed; the run ends with the state it could save."""


class Trainer:
  """The run's changing state, and what happens at each step."""

  def __init__(self, setup: Setup, started: float, after_imports_mb: float | None,
               run_step: fallback.Executor = fallback.run_plainly,
               stop: cli.StopRequest | None = None):
    self.setup, self.tc = setup, setup.config.train
    self.run_step = run_step  # Runs each step sent to a training accelerator.
    self.state, self.best = setup.state, setup.best
    self.started = started  # When the run began, its imports done.
    self.is_main = devices.is_main_process()  # Only process 0 writes the run's files.
    self.checkpoints = checkpoint.Checkpoints(setup.workdir)
    self.metrics_file = metrics.MetricsFile(
        setup.workdir / "metrics.jsonl" if self.is_main else None, setup.start_iter)
    self.stop = stop or cli.StopRequest()  # Installed by the caller.
    self.close_error = None  # A summary that could not be written, after a good run.
    self.dropout_key = stream_key(setup.config, train.DROPOUT_STREAM)
    self.throughput = metrics.Throughput(
        self.tc.batch_size * setup.config.model.block_size, setup.start_iter)
    self.last_record, self.save_ms, self.eval_seconds = None, [], 0.0
    self.state_iter, self.evaluating = setup.start_iter, False  # For a failed device.
    self.eval_fallback = None  # Where and why the CPU took over evaluation.
    self.full_val = None  # The final evaluation over the whole val split, when it ran.
    self.note_fallback(setup.start_iter)  # The start-up probe's.
    self.startup_s, self.memory_mb = None, {"after_imports": after_imports_mb}
    self.compile_s = None  # The train step's, once compiled.
    self.decay_timer = budget.decay_timer(setup.calibration, self.tc)
    self.loop_start = time.perf_counter()

  def loop(self) -> str:
    """Trains to the target iteration or until stopped; returns the run's status."""
    pending, stopping, step = None, False, self.setup.start_iter  # pending: one step behind.
    self.compile()
    if self.decay_timer:
      self.decay_timer.begin(step, time.perf_counter(), overhead_s=self.compile_s)
    while step < self.tc.iters:  # A DecayTimer may move the target.
      step += 1
      step_metrics = self.step(step)
      fixed = self.fix_decay(step)  # Saved at once: a resume after a kill keeps the horizon.
      tc = self.tc
      self.check_saves()
      if pending and pending[0] % tc.log_interval == 0:
        self.record(*pending)
      pending = (step, step_metrics)
      stopping = devices.any_process(self.stop.signum is not None)
      if step % tc.eval_interval == 0 or step == tc.iters or stopping:
        self.record(step, step_metrics, with_eval=not stopping)
        pending = None
      if step % tc.checkpoint_interval == 0 or step == tc.iters or stopping or fixed:
        if pending and pending[0] % tc.log_interval == 0:  # Its throughput, before the save.
          self.record(*pending)
          pending = None
        if stopping:
          print(f"Interrupted at iteration {step}. Saving checkpoint...", flush=True)
        else:
          metrics.phase(f"Saving checkpoint at iteration {step}...")
        self.save_ms.append(1e3 * self.save("latest", step))
        self.throughput.mark(step)
      if stopping:
        break
    self.check_saves(wait=True)
    if not stopping:
      self.evaluate_full()
    return "interrupted" if stopping else "completed"

  def batch(self, step: int):
    """The step's windows, placed on the training devices."""
    return place_batch(self.setup.sampler(step), self.setup.mesh)

  def compile(self) -> None:
    print("Compiling train step...", end=" ", flush=True)
    start = time.perf_counter()
    setup = self.setup
    self.step_fn = compile_step(setup.step_fn, setup.config, self.state,
                                self.batch(setup.start_iter + 1), self.dropout_key)
    self.compile_s = time.perf_counter() - start
    print(f"done in {self.compile_s:.1f}s", flush=True)
    self.memory_mb["compile_peak"] = memory.peak_resident_mb()
    self.throughput.mark(self.setup.start_iter)

  def fix_decay(self, step: int) -> bool:
    """A --time_budget run with --lr_schedule=wsd: fixes the horizon once the loop's pace
    says the decay starts with the next step (budget.DecayTimer); rebuilds the step for it
    unless the compiled one already decays there, and rewrites flags.cfg. True when it
    fixed it at this step. Asked every --log_interval steps: with several processes each
    asking is a collective."""
    if self.decay_timer is None or not self.decay_timer.asks(step, self.tc.log_interval):
      return False
    now = time.perf_counter()
    horizon = self.decay_timer.horizon(step, now) or 0
    horizon = int(devices.from_process_0(np.int64(horizon)))  # Process 0's choice, for all.
    if not horizon:
      return False
    config, pace_s = self.setup.config, self.decay_timer.pace(step, now)
    if (horizon, step) != (self.tc.iters, optim.decay_start(self.tc)):  # Else compiled.
      config = config.replace(**budget.fixed_decay(step, horizon))
      self.rebuild(config, step)
    calibration, self.decay_timer = self.setup.calibration, None
    print(f"Decay starts after iteration {step}: target {horizon:,} iterations (the loop's "
          f"{1e3 * pace_s:.0f} ms/it; first estimate {calibration.iters:,}).", flush=True)
    if self.is_main:
      rundir.write_flags(self.setup.workdir, config,
                         calibration.fixed_comment(step, horizon, pace_s))
      rundir.update_start(self.setup.workdir, decay_fixed={
          "after_iter": step, "iters": horizon, "loop_s_per_iter": pace_s})
    return True

  def rebuild(self, config, step: int) -> None:
    """The train step built and compiled for `config`, which the run goes on with."""
    setup = self.setup
    step_fn = jit_step(config, setup.mesh)
    self.step_fn = compile_step(step_fn, config, self.state, self.batch(step + 1),
                                self.dropout_key)
    self.setup = dataclasses.replace(setup, config=config, step_fn=step_fn)
    self.tc = config.train

  def step(self, step: int) -> dict:
    """Dispatches one train step; returns its metrics (still on the device)."""
    def work():
      return self.step_fn(self.state, self.batch(step), jax.random.fold_in(self.dropout_key,
                                                                           step))
    self.state, step_metrics = fallback.on_training_devices(
        self.setup.plan.placement, self.run_step, "train-step", work)
    self.state_iter = step
    if self.startup_s is None:  # Once: wait for the first iteration to end.
      jax.block_until_ready(step_metrics)
      self.startup_s = time.perf_counter() - self.started
      memory.release_free_memory()  # What compiling the loop's functions left behind.
    return step_metrics

  def record(self, step: int, step_metrics: dict, with_eval: bool = False) -> None:
    """Logs a step: metrics.jsonl and a line; with an evaluation when `with_eval`."""
    loss = float(step_metrics["loss"])
    if not np.isfinite(loss):
      raise self.diverged(step, f"loss {loss}")
    rec = {"iter": step, "train_loss": loss, "lr": float(step_metrics["lr"]),
           "grad_norm": float(step_metrics["grad_norm"]), **self.throughput.since_mark(step),
           "rss_mb": memory.resident_mb()}
    if with_eval:
      rec |= self.evaluate(step)
    rec["wall_s"] = time.perf_counter() - self.loop_start
    eta = None
    if "ms_per_iter" in rec:
      left = self.tc.iters - step
      evals_left = -(-left // self.tc.eval_interval)
      eta = left * rec["ms_per_iter"] / 1e3 + evals_left * self.eval_seconds
    self.metrics_file.write(rec)
    print(metrics.log_line(rec, self.best, eta), flush=True)
    self.last_record = rec
    self.throughput.mark(step)

  def evaluate(self, step: int) -> dict:
    """The loss estimates at `step`; a new best val loss saves the best checkpoint."""
    metrics.phase(f"Evaluating at iteration {step}...")
    start = time.perf_counter()
    self.evaluating = True  # Left set by an error: it is not the training device's.
    estimates = self.setup.evaluator(train.eval_params(self.state))
    estimates["val_bpc"] = self.setup.corpus.val_bpc(estimates["val_loss"])
    self.evaluating = False
    self.note_fallback(step)
    self.eval_seconds = time.perf_counter() - start
    if self.best is None or estimates["val_loss"] < self.best[0]:
      self.best = (estimates["val_loss"], step)
      self.save("best", step)
    memory.release_free_memory()  # What compiling the first estimate and save left.
    return estimates | {"eval_s": self.eval_seconds}

  def evaluate_full(self) -> None:
    """The final val loss over the whole split, every window once: the best of many small
    estimates is biased low and noisy (summary.json's final_val_full)."""
    metrics.phase("Evaluating over the whole val split...")
    start = time.perf_counter()
    self.evaluating = True
    loss, windows = self.setup.evaluator.full_val(train.eval_params(self.state))
    self.evaluating = False
    self.note_fallback(self.state_iter)
    self.full_val = {"loss": loss, "windows": windows, "seconds": time.perf_counter() - start}

  def save(self, kind: str, step: int) -> float:
    """Starts saving the state unless it diverged (NaN weights never replace good ones);
    returns the seconds it blocked."""
    if not train.all_finite(self.state["params"]):
      raise self.diverged(step, "weights not finite")
    try:
      return self.checkpoints.save(kind, step, self.state, self.meta(step))
    except checkpoint.SaveFailed as failed:
      self.retry(failed)
      if kind == "latest":  # The retry saved this state.
        return 0.0
      return self.checkpoints.save(kind, step, self.state, self.meta(step), retried=True)

  def meta(self, step: int) -> dict:
    return checkpoint.make_meta(step, self.best, self.setup.tokenizer, self.setup.config,
                                data=self.setup.corpus.fingerprint)

  def check_saves(self, wait: bool = False) -> None:
    """Looks at the saves in flight (waits for them with `wait`): a failed one is retried at
    once."""
    try:
      self.checkpoints.wait() if wait else self.checkpoints.poll()
    except checkpoint.SaveFailed as failed:
      self.retry(failed)

  def retry(self, failed: checkpoint.SaveFailed) -> None:
    """A failed save's second try: the state now, as the latest checkpoint, waited for. A
    second failure ends the run (SaveFailed), the checkpoints before it kept."""
    if failed.retried or not train.all_finite(self.state["params"]):
      raise failed
    print(f"⚠ Could not save the {failed.kind} checkpoint at iteration {failed.step} "
          f"({failed.reason}); saving iteration {self.state_iter} again...", flush=True)
    self.checkpoints.save("latest", self.state_iter, self.state, self.meta(self.state_iter),
                          retried=True)
    self.checkpoints.wait(retried=True)
    if failed.kind == "best":
      print(f"The best checkpoint stays {self.checkpoints.path('best')}.", flush=True)

  def note_fallback(self, step: int) -> bool:
    """Records, once, that the CPU took over evaluation (in run.json's entry for this start
    now, in summary.json at the end); whether it is new."""
    fallback = self.setup.evaluator.fallback
    if fallback is None or self.eval_fallback is not None:
      return False
    self.eval_fallback = {"at_iter": step, **fallback}
    if self.is_main:
      rundir.update_start(self.setup.workdir, eval_fallback=self.eval_fallback)
    return True

  def device_failed(self, error: Exception) -> TrainingDeviceFailed:
    """Saves the last good state there is; the one-line error that says what was kept and
    how to go on on the CPU."""
    return TrainingDeviceFailed(
        f"Training on {platforms.device_name(self.setup.mesh.devices.flat[0])} failed at iteration "
        f"{self.state_iter + 1} or before ({platforms.error_line(error)}). {self.rescue()} "
        f"Continue on the CPU: python -m randygpt.main --resume --train_platform=cpu "
        f"--workdir={self.setup.workdir}")

  def rescue(self) -> str:
    """Saves the state as the latest checkpoint if it is still intact (each step consumes
    the one before it) and newer; the sentence that says what is kept."""
    with contextlib.suppress(Exception):  # A save that failed leaves the one before it.
      self.checkpoints.wait()
    latest = self.checkpoints.path("latest")
    alive = not any(x.is_deleted() for x in jax.tree.leaves(self.state))
    if alive and (latest is None or int(latest.name) < self.state_iter):
      try:
        self.save("latest", self.state_iter)
        self.checkpoints.wait()
        latest = self.checkpoints.path("latest")
        return f"Its state at iteration {self.state_iter} is saved: {latest}."
      except Exception:  # The state is unreadable too, or not finite: it stays unsaved.
        pass
    kept = self.checkpoints.path("latest") or self.checkpoints.path("best")
    return f"Its last checkpoint is kept: {kept}." if kept else "Nothing was saved."

  def diverged(self, step: int, what: str) -> Diverged:
    self.checkpoints.wait()
    kept = self.checkpoints.path("latest") or self.checkpoints.path("best")
    return Diverged(f"Training diverged at iteration {step} ({what}). "
                    + (f"The last good checkpoint is kept: {kept}. " if kept else "")
                    + "Try a lower --learning_rate or --grad_clip.")

  def close(self, status: str) -> dict:
    """Ends the checkpoint writers and the metrics file; writes and returns the summary."""
    self.checkpoints.close()
    self.metrics_file.close()
    last, best = self.last_record or {}, self.best or (None, None)
    summary = {
        "status": status,
        "iters": last.get("iter", self.setup.start_iter),
        "final_train_loss": last.get("train_loss"),
        "final_val_loss": last.get("val_loss"),
        "final_val_full": self.full_val and self.full_val["loss"],
        "final_val_full_windows": self.full_val and self.full_val["windows"],
        "best_val_loss": best[0],
        "best_iter": best[1],
        "best_val_bpc": None if best[0] is None else self.setup.corpus.val_bpc(best[0]),
        "best_checkpoint": str(self.checkpoints.path("best") or "") or None,
        "latest_checkpoint": str(self.checkpoints.path("latest") or "") or None,
        "tokens_per_sec": last.get("tokens_per_sec"),
        "wall_s": time.perf_counter() - self.loop_start,
        "n_params": model.n_params(self.setup.config.model),
        "checkpoint_blocked_ms_max": max(self.save_ms, default=None),
        "startup_s": self.startup_s,
        "compile_s": self.compile_s,
        "memory_mb": self.memory_mb | {"peak": memory.peak_resident_mb(), "device_peak":
                                       memory.device_peak_mb(self.setup.mesh.devices.flat[0])},
        "eval_fallback": self.eval_fallback,
    }
    if self.is_main:
      try:
        metrics.write_json(self.setup.workdir / "summary.json", summary)
      except metrics.WriteFailed as error:  # Raised after the loop, unless it failed first.
        self.close_error = error
    return summary


def train_and_close(trainer: Trainer) -> dict:
  """The loop, then the summary whatever happened; a stop by an error re-raises it (the
  first error: a summary that cannot be written then goes unsaid)."""
  status = "failed"
  try:
    status = trainer.loop()
  except Diverged:
    status = "diverged"
    raise
  except metrics.WriteFailed as error:  # Metrics or run.json: the state is saved first.
    raise metrics.write_failed(error.path, error.error, kept=trainer.rescue() + " ") from None
  except jax.errors.JaxRuntimeError as error:
    if not trainer.setup.plan.placement.train_on_accelerator or trainer.evaluating:
      raise
    raise trainer.device_failed(error) from error
  finally:
    summary = trainer.close(status)
  if trainer.close_error:
    raise trainer.close_error
  return summary


def finish(trainer: Trainer, summary: dict) -> dict:
  """Says where the checkpoints are, draws the samples, and says how to go on."""
  setup, status = trainer.setup, summary["status"]
  if trainer.save_ms:
    print(f"Saved latest checkpoint: {summary['latest_checkpoint']}")
    print(f"Best checkpoint: {summary['best_checkpoint']} (val {trainer.best[0]:.4f})"
          if trainer.best else "No best checkpoint yet: no evaluation has run.", flush=True)
  if trainer.full_val:
    full = trainer.full_val
    print(f"Final val loss over the whole split: {full['loss']:.4f} ({full['windows']:,} "
          f"windows, {full['seconds']:.1f}s)", flush=True)
  if trainer.is_main and status == "completed":
    setup.evaluator.write_samples(train.eval_params(trainer.state), setup.tokenizer, setup.prompts,
                                  setup.config.train.seed, setup.workdir / "samples.txt",
                                  trainer.stop)
    if trainer.note_fallback(summary["iters"]):  # The CPU took over the sampling.
      summary = summary | {"eval_fallback": trainer.eval_fallback}
      metrics.write_json(setup.workdir / "summary.json", summary)
  if trainer.save_ms:
    print("\n".join(rundir.next_steps(setup.workdir, status, setup.config.train.iters)),
          flush=True)
  if status == "interrupted" or trainer.stop.signum:
    return summary | {"signal": trainer.stop.signum or signal.SIGINT}
  return summary
