"""The training loop: state, the jitted train and eval steps, checkpoints, samples.

The train state is a plain dict `{"params", "opt"}`; the optimizer state carries the
learning-rate schedule's step count. Data windows and dropout masks are pure functions
of (seed, iteration), so a resumed run continues exactly as if it had never stopped.
"""

import contextlib
import dataclasses
import functools
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from randygpt import (checkpoint, data, devices, footprint, generate, memory, metrics, model,
                      optim, platforms, rundir)
from randygpt.config import ModelConfig, RunConfig, TrainConfig
from randygpt.errors import UserError

# Independent random streams, each derived from the seed with `jax.random.fold_in`.
INIT_STREAM, DATA_STREAM, DROPOUT_STREAM, EVAL_STREAM = range(4)
# Tokens per loss-estimate chunk. Accelerators gain from large batches; on the CPU, chunks
# past ~2K tokens fall out of cache and run 2.5x slower (measured, see WORKSPACE.md).
EVAL_CHUNK_TOKENS = {"cpu": 2048, "accelerator": 262144}
# Tokens per microbatch of a train step on the CPU: a step over slices this small ran
# 1.2-1.6x faster than over the whole batch at once at the default and medium shapes
# (measured, see WORKSPACE.md), as each slice's activations stay in cache.
CPU_MICROBATCH_TOKENS = 512


def init_train_state(key: jax.Array, model_config: ModelConfig,
                     optimizer: optax.GradientTransformation) -> dict:
  params = model.init_params(key, model_config)
  return {"params": params, "opt": optimizer.init(params)}


def train_step(state: dict, batch, rng: jax.Array, *, model_config: ModelConfig,
               optimizer: optax.GradientTransformation,
               microbatches: int = 1) -> tuple[dict, dict]:
  """One AdamW step on the batch loss (with dropout), its gradient summed over
  `microbatches` equal slices of the batch run one after another; returns the new state
  and metrics."""
  def slices(x_BxT):
    # Slice i takes rows i, i+k, i+2k...: each device's rows stay on that device.
    b, t = x_BxT.shape
    return x_BxT.reshape(b // microbatches, microbatches, t).swapaxes(0, 1)

  def add_slice(total, inputs):
    i, microbatch = inputs[0], inputs[1:]
    loss_and_grads = jax.value_and_grad(model.loss_fn)(
        state["params"], microbatch, model_config, train=True, rng=jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, total, loss_and_grads), None

  zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
  total, _ = jax.lax.scan(add_slice, zeros, (jnp.arange(microbatches), *map(slices, batch)))
  loss, grads = jax.tree.map(lambda x: x / microbatches, total)
  updates, opt = optimizer.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
  return {"params": params, "opt": opt}, {"loss": loss, "grad_norm": grad_norm}


def train_microbatches(tc: TrainConfig, model_config: ModelConfig, platform: str) -> int:
  """--microbatches, or for 0: on the CPU the fewest slices of the batch (dividing it) of
  at most CPU_MICROBATCH_TOKENS tokens each; elsewhere 1."""
  if tc.microbatches or platform != "cpu":
    return tc.microbatches or 1
  sequences_per_slice = largest_fitting_divisor(tc.batch_size, model_config.block_size,
                                                CPU_MICROBATCH_TOKENS)
  return tc.batch_size // sequences_per_slice


def eval_loss(params, tokens: jax.Array, key: jax.Array, *, model_config: ModelConfig,
              batch_size: int, eval_iters: int, chunk_batches: int = 1) -> jax.Array:
  """Mean loss over `eval_iters` batches of random windows, without dropout, run
  `chunk_batches` batches at a time (a divisor of `eval_iters`), one chunk in memory at a
  time. The windows, and so the estimate, do not depend on the chunking."""
  block = model_config.block_size
  starts = data.window_starts(tokens, key, eval_iters * batch_size, block)

  def chunk_loss(starts_C):
    return model.loss_fn(params, data.windows(tokens, starts_C, block), model_config)
  return jax.lax.map(chunk_loss, starts.reshape(eval_iters // chunk_batches, -1)).mean()


def largest_fitting_divisor(count: int, tokens_each: int, max_tokens: int) -> int:
  """The largest divisor n of `count` (at least 1) whose n items of `tokens_each` tokens
  hold at most `max_tokens`: how many batches an estimate runs at once, or how many
  sequences a microbatch holds."""
  return max(n for n in range(1, count + 1)
             if count % n == 0 and (n == 1 or n * tokens_each <= max_tokens))


def jit_eval_loss(tc: TrainConfig, model_config: ModelConfig, platform: str):
  """The jitted loss estimate, in chunks as large as suit `platform`."""
  max_tokens = EVAL_CHUNK_TOKENS.get(platform, EVAL_CHUNK_TOKENS["accelerator"])
  chunk = largest_fitting_divisor(tc.eval_iters, tc.batch_size * model_config.block_size,
                                  max_tokens)
  return jax.jit(functools.partial(eval_loss, model_config=model_config,
                                   batch_size=tc.batch_size, eval_iters=tc.eval_iters,
                                   chunk_batches=chunk))


def jit_data_parallel(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                      mesh: jax.sharding.Mesh, microbatches: int = 1):
  """The jitted batch sampler and train step over `mesh`: batches split along `data`, the
  state replicated (XLA all-reduces the gradients)."""
  replicated, batch_sharded = devices.replicated(mesh), devices.batch_sharded(mesh)
  get_batch = jax.jit(data.get_batch, static_argnums=(2, 3),
                      out_shardings=(batch_sharded, batch_sharded))
  step = jax.jit(functools.partial(train_step, model_config=model_config, optimizer=optimizer,
                                   microbatches=microbatches),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  return get_batch, step


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


class StopRequest:
  """Turns SIGINT/SIGTERM into a request that the loop honours after the current step."""

  def __init__(self):
    self.signum = None

  def __call__(self, signum, frame):
    if self.signum is None:  # A second Ctrl-C while stopping changes nothing.
      self.signum = signum
      print(f"\n{signal.Signals(signum).name} received: stopping after this step.", flush=True)

  @contextlib.contextmanager
  def installed(self):
    previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def restore_or_init(key: jax.Array, model_config: ModelConfig,
                    optimizer: optax.GradientTransformation, source: Path | None,
                    sharding: jax.sharding.Sharding) -> dict:
  """A fresh train state, or the one saved at `source`, placed with `sharding`."""
  init = functools.partial(init_train_state, model_config=model_config, optimizer=optimizer)
  if source is None:  # One jitted init: eager ops would each compile and stay cached.
    return jax.jit(init, out_shardings=sharding)(key)
  restored = checkpoint.restore_state(
      source, checkpoint.abstract_like(jax.eval_shape(init, key), sharding))
  # jaxlib 0.5 (the Metal stack) can hand back arrays that share host memory with NumPy;
  # donating those to the train step corrupts the heap, so the step gets its own copies.
  return jax.tree.map(jnp.copy, restored)


def check_prompts(prompts, tokenizer: data.CharTokenizer, default_prompts=("ROMEO:",)):
  """Prompts the vocabulary can encode: a user's prompt that cannot is an error; a
  default that cannot falls back to a newline (or the vocabulary's first character)."""
  start = "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
  checked = []
  for prompt in prompts:
    missing = tokenizer.missing(prompt)
    if missing and tuple(prompts) == tuple(default_prompts):
      print(f"Note: the default prompt {prompt!r} has characters outside this data's "
            f"vocabulary; samples start from {start!r} instead.")
      prompt = start
    elif missing:
      raise UserError(f"--prompt={prompt!r} has characters that are not in the training "
                      f"text's vocabulary: {' '.join(repr(c) for c in missing)}.")
    checked.append(prompt or start)
  return tuple(checked)


def _check_vocab(saved_chars, tokenizer: data.CharTokenizer, path: Path, data_path: str):
  if tuple(saved_chars) == tokenizer.chars:
    return
  if len(saved_chars) != tokenizer.vocab_size:
    detail = f"Checkpoint vocab_size {len(saved_chars)} != data vocab_size {tokenizer.vocab_size}"
  else:
    detail = "Checkpoint vocabulary differs from the data's (same size, other characters)"
  raise UserError(f"{detail}: {path} was trained on other text than --data={data_path}. "
                  "Resume with the text it was trained on, or start a new run in another "
                  "--workdir.")


def run(config: RunConfig) -> dict:
  """Train as `config` says, write the workdir, print samples; returns the summary. The
  workdir is locked meanwhile: a second run on it is refused."""
  with rundir.claim(Path(config.location.workdir), lock=devices.is_main_process()):
    return _run(config)


def _run(config: RunConfig) -> dict:
  started, memory_mb = time.perf_counter(), {"after_imports": memory.resident_mb()}
  loc = config.location
  workdir = Path(loc.workdir)
  source, discard = checkpoint.plan_start(workdir, loc.resume, loc.resume_from, loc.overwrite)
  meta = checkpoint.read_meta(source) if source else None
  if meta:
    config = config.resumed(meta["config"], str(source))
  start_iter = meta["iter"] if meta else 0
  if start_iter >= config.train.iters:
    print(f"Already at iteration {start_iter} (target {config.train.iters}). Nothing to "
          f"train. Pass a higher --iters to train further.")
    return {"status": "nothing to train"}

  text, data_source = data.load_text(config.data.data, url=config.data.data_url,
                                     encoding=config.data.data_encoding)
  text, tokenizer = data.tokenize(text, config.data.tokenizer)
  if meta:
    _check_vocab(meta["vocab"], tokenizer, source, config.data.data)
  prompts = check_prompts(config.sample.prompt, tokenizer)
  train_np, val_np = data.split(tokenizer.encode(text), config.model.block_size)
  model_config = dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size)
  footprint.check(model_config, config.sample, config.train)
  if not config.train.lr_decay_iters:  # The horizon is fixed at the first start.
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, lr_decay_iters=config.train.iters))
  tc = config.train

  placement = platforms.place(loc.train_platform, loc.eval_platform)
  mesh = devices.data_mesh(placement.train_devices)
  devices.check_batch_divides(tc.batch_size, mesh.size)
  microbatches = train_microbatches(tc, model_config, mesh.devices.flat[0].platform)
  replicated = devices.replicated(mesh)
  root = jax.random.key(tc.seed)
  stream = functools.partial(jax.random.fold_in, root)
  optimizer = optim.make_optimizer(tc, tc.lr_decay_iters)
  schedule = optim.lr_schedule(tc, tc.lr_decay_iters)
  state = restore_or_init(stream(INIT_STREAM), model_config, optimizer, source, replicated)
  best = None  # (val loss, iteration) of the best evaluation so far.
  if meta and meta["best_iter"] is not None:
    best = (meta["best_val_loss"], meta["best_iter"])

  is_main = devices.is_main_process()  # Only process 0 writes the run's files.
  if is_main:
    for path in discard:
      shutil.rmtree(path)
    tokenizer.save(workdir / "vocab.json")
    metrics.write_text(workdir / "flags.cfg", config.flagfile())
    rundir.record_start(workdir, start_iter)
    metrics.write_json(workdir / "summary.json", {"status": "running", "iters": start_iter})
  devices.sync("workdir ready")
  checkpoints = checkpoint.Checkpoints(workdir)
  train_tokens = jax.device_put(train_np, replicated)
  eval_tokens = jax.device_put({"train": train_np, "val": val_np}, placement.eval_device)
  tokens_per_step = tc.batch_size * model_config.block_size
  n_params = model.count_params(state["params"])

  print(f"data: {data_source} | {len(text):,} characters | vocab {tokenizer.vocab_size} | "
        f"train {len(train_np):,} / val {len(val_np):,} tokens")
  print(f"model: {model_config.n_layer} layers, {model_config.n_head} heads, "
        f"n_embd {model_config.n_embd}, block {model_config.block_size}, dropout "
        f"{model_config.dropout} | {n_params:,} parameters")
  print(f"devices: {mesh.size} x {mesh.devices.flat[0].platform} (data-parallel) | batch "
        f"{tc.batch_size} x {model_config.block_size} = {tokens_per_step:,} tokens/step in "
        f"{microbatches} microbatch{'es' if microbatches > 1 else ''} | "
        f"workdir: {workdir}")
  for note in placement.notes:
    print(note)
  if source:
    print(f"Resumed from {source} at iteration {start_iter} (target {tc.iters}, learning "
          f"rate horizon {tc.lr_decay_iters}).")

  get_batch, step_fn = jit_data_parallel(model_config, optimizer, mesh, microbatches)
  evaluate = jit_eval_loss(tc, model_config, placement.eval_device.platform)
  # The same eval windows every time: comparable estimates.
  eval_key = jax.device_put(stream(EVAL_STREAM), placement.eval_device)

  def batch_for(step):
    return get_batch(train_tokens, jax.random.fold_in(stream(DATA_STREAM), step),
                     tc.batch_size, model_config.block_size)

  def meta_for(step):
    best_val, best_iter = best or (None, None)
    return {"format": checkpoint.FORMAT, "iter": step, "best_val_loss": best_val,
            "best_iter": best_iter, "vocab": list(tokenizer.chars),
            "config": config.to_flags()}

  metrics_file = metrics.MetricsFile(workdir / "metrics.jsonl" if is_main else None,
                                     start_iter)
  stopper = StopRequest()
  status, last_record, save_ms = "failed", None, []  # save_ms: how long each save blocked.
  run_start = time.perf_counter()
  startup_s = None  # From the start of _run (imports done) to the end of the first iteration.
  eval_seconds = 0.0
  with stopper.installed():
    try:
      print("Compiling train step...", end=" ", flush=True)
      t0 = time.perf_counter()
      step_fn = step_fn.lower(state, batch_for(start_iter + 1), stream(DROPOUT_STREAM)).compile()
      print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)
      memory_mb["compile_peak"] = memory.peak_resident_mb()
      throughput = metrics.Throughput(tokens_per_step, start_iter)

      def diverged(step, what):
        checkpoints.wait()
        kept = checkpoints.path("latest") or checkpoints.path("best")
        return UserError(f"Training diverged at iteration {step} ({what}). "
                         + (f"The last good checkpoint is kept: {kept}. " if kept else "")
                         + "Try a lower --learning_rate or --grad_clip.")

      def save(kind, step):
        """Saves the state unless it diverged: NaN weights never replace good ones."""
        if not all_finite(state["params"]):
          raise diverged(step, "weights not finite")
        return checkpoints.save(kind, step, state, meta_for(step))

      def record(step, step_metrics, with_eval):
        nonlocal best, eval_seconds, last_record
        loss = float(step_metrics["loss"])
        if not np.isfinite(loss):
          raise diverged(step, f"loss {loss}")
        rec = {"iter": step, "train_loss": loss, "lr": float(schedule(step - 1)),
               "grad_norm": float(step_metrics["grad_norm"]), **throughput.since_mark(step),
               "rss_mb": memory.resident_mb()}
        if with_eval:
          metrics.phase(f"Evaluating at iteration {step}...")
          t_eval = time.perf_counter()
          params = placement.for_eval(state["params"])
          rec["eval_train_loss"] = float(evaluate(params, eval_tokens["train"],
                                                  jax.random.fold_in(eval_key, 0)))
          rec["val_loss"] = float(evaluate(params, eval_tokens["val"],
                                           jax.random.fold_in(eval_key, 1)))
          eval_seconds = time.perf_counter() - t_eval
          if best is None or rec["val_loss"] < best[0]:
            best = (rec["val_loss"], step)
            save("best", step)
          memory.release_free_memory()  # What compiling the first estimate and save left.
        rec["wall_s"] = time.perf_counter() - run_start
        eta = None
        if "ms_per_iter" in rec:
          left = tc.iters - step
          evals_left = -(-left // tc.eval_interval)
          eta = left * rec["ms_per_iter"] / 1e3 + evals_left * eval_seconds
        metrics_file.write(rec)
        print(metrics.log_line(rec, best, eta), flush=True)
        last_record = rec
        throughput.mark(step)

      pending = None  # Metrics of the last dispatched step, read one step behind.
      stopping = False
      for step in range(start_iter + 1, tc.iters + 1):
        state, step_metrics = step_fn(state, batch_for(step),
                                      jax.random.fold_in(stream(DROPOUT_STREAM), step))
        if startup_s is None:  # Once: wait for the first iteration to end.
          jax.block_until_ready(step_metrics)
          startup_s = time.perf_counter() - started
          memory.release_free_memory()  # What compiling the loop's functions left behind.
        if pending and pending[0] % tc.log_interval == 0:
          record(*pending, with_eval=False)
        pending = (step, step_metrics)
        stopping = devices.any_process(stopper.signum is not None)
        if step % tc.eval_interval == 0 or step == tc.iters or stopping:
          record(step, step_metrics, with_eval=not stopping)
          pending = None
        if step % tc.checkpoint_interval == 0 or step == tc.iters or stopping:
          if stopping:
            print(f"Interrupted at iteration {step}. Saving checkpoint...", flush=True)
          else:
            metrics.phase(f"Saving checkpoint at iteration {step}...")
          save_ms.append(1e3 * save("latest", step))
          throughput.mark(step)
        if stopping:
          break
      checkpoints.wait()  # A save that failed fails the run.
      status = "interrupted" if stopping else "completed"
    except UserError as e:
      status = "diverged" if "diverged" in str(e) else "failed"
      raise
    finally:
      checkpoints.close()
      metrics_file.close()
      summary = {
          "status": status,
          "iters": last_record["iter"] if last_record else start_iter,
          "final_train_loss": last_record["train_loss"] if last_record else None,
          "final_val_loss": last_record.get("val_loss") if last_record else None,
          "best_val_loss": best[0] if best else None,
          "best_iter": best[1] if best else None,
          "best_checkpoint": str(checkpoints.path("best") or "") or None,
          "latest_checkpoint": str(checkpoints.path("latest") or "") or None,
          "tokens_per_sec": last_record.get("tokens_per_sec") if last_record else None,
          "wall_s": time.perf_counter() - run_start,
          "n_params": n_params,
          "checkpoint_blocked_ms_max": max(save_ms, default=None),
          "startup_s": startup_s,
          "memory_mb": memory_mb | {"peak": memory.peak_resident_mb()},
      }
      if is_main:
        metrics.write_json(workdir / "summary.json", summary)

    if save_ms:
      print(f"Saved latest checkpoint: {summary['latest_checkpoint']}")
      print(f"Best checkpoint: {summary['best_checkpoint']} (val {best[0]:.4f})" if best else
            "No best checkpoint yet: no evaluation has run.", flush=True)
    if is_main and status == "completed":
      generate.write_samples(placement.for_eval(state["params"]), tokenizer, prompts,
                             tc.seed, model_config, config.sample, workdir / "samples.txt",
                             stopper)
    if save_ms:
      print("\n".join(rundir.next_steps(workdir, status, tc.iters)), flush=True)
  if status == "interrupted" or stopper.signum:
    return summary | {"signal": stopper.signum or signal.SIGINT}
  return summary
