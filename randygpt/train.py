"""The training loop: state, the jitted train and eval steps, logging, samples.

The train state is a plain dict `{"params", "opt"}`; the optimizer state carries the
learning-rate schedule's step count. Data windows and dropout masks are pure
functions of (seed, iteration), so a run is reproducible step by step.
"""

import contextlib
import functools
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from randygpt import data, metrics, model, optim, sample
from randygpt.config import ModelConfig, RunConfig
from randygpt.errors import UserError

# Independent random streams, each derived from the seed with `jax.random.fold_in`.
INIT_STREAM, DATA_STREAM, DROPOUT_STREAM, EVAL_STREAM, SAMPLE_STREAM = range(5)


class Diverged(Exception):
  pass


def init_train_state(key: jax.Array, model_config: ModelConfig,
                     optimizer: optax.GradientTransformation) -> dict:
  params = model.init_params(key, model_config)
  return {"params": params, "opt": optimizer.init(params)}


def train_step(state: dict, batch, rng: jax.Array, *, model_config: ModelConfig,
               optimizer: optax.GradientTransformation) -> tuple[dict, dict]:
  """One AdamW step on the batch loss (with dropout); returns the new state and metrics."""
  loss, grads = jax.value_and_grad(model.loss_fn)(state["params"], batch, model_config,
                                                  train=True, rng=rng)
  updates, opt = optimizer.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
  return {"params": params, "opt": opt}, {"loss": loss, "grad_norm": grad_norm}


def eval_loss(params, tokens: jax.Array, key: jax.Array, *, model_config: ModelConfig,
              batch_size: int, eval_iters: int) -> jax.Array:
  """Mean loss over `eval_iters` batches, without dropout; one batch in memory at a time."""
  def batch_loss(k):
    batch = data.get_batch(tokens, k, batch_size, model_config.block_size)
    return model.loss_fn(params, batch, model_config)
  return jax.lax.map(batch_loss, jax.random.split(key, eval_iters)).mean()


class _StopRequest:
  """Turns SIGINT/SIGTERM into a request that the loop honours after the current step."""

  def __init__(self):
    self.signum = None

  def __call__(self, signum, frame):
    if self.signum is not None:
      return  # A second Ctrl-C while stopping changes nothing.
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


def check_prompts(prompts, tokenizer: data.CharTokenizer, default_prompts, text: str):
  """Prompts the vocabulary can encode: a user's prompt that cannot is an error; a
  default that cannot falls back to a newline (or the data's first character)."""
  checked = []
  for prompt in prompts:
    missing = tokenizer.missing(prompt)
    if missing and tuple(prompts) == tuple(default_prompts):
      start = "\n" if "\n" in tokenizer.chars else text[0]
      print(f"Note: the default prompt {prompt!r} has characters outside this data's "
            f"vocabulary; samples start from {start!r} instead.")
      prompt = start
    elif missing:
      raise UserError(f"--prompt={prompt!r} has characters that are not in the training "
                      f"text's vocabulary: {' '.join(repr(c) for c in missing)}.")
    checked.append(prompt or ("\n" if "\n" in tokenizer.chars else text[0]))
  return tuple(checked)


def run(config: RunConfig, default_prompts=("ROMEO:",)) -> dict:
  """Train as `config` says, write the workdir, print samples; returns the summary."""
  text, source = data.load_text(config.data, url=config.data_url,
                                encoding=config.data_encoding)
  tokenizer = data.CharTokenizer.from_text(text)
  prompts = check_prompts(config.sample.prompts, tokenizer, default_prompts, text)
  train_np, val_np = data.split(tokenizer.encode(text), config.model.block_size)
  model_config = ModelConfig(**{**vars(config.model), "vocab_size": tokenizer.vocab_size})
  tc = config.train

  workdir = Path(config.workdir)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir={workdir} is a file, not a directory.")
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer.save(workdir / "vocab.json")
  (workdir / "flags.cfg").write_text(config.flags_cfg, encoding="utf-8")

  root = jax.random.key(tc.seed)
  stream = functools.partial(jax.random.fold_in, root)
  decay_iters = tc.lr_decay_iters or tc.iters
  optimizer = optim.make_optimizer(tc, decay_iters)
  schedule = optim.lr_schedule(tc, decay_iters)
  state = init_train_state(stream(INIT_STREAM), model_config, optimizer)
  n_params = model.count_params(state["params"])
  train_tokens, val_tokens = jnp.asarray(train_np), jnp.asarray(val_np)
  tokens_per_step = tc.batch_size * model_config.block_size

  print(f"data: {source} | {len(text):,} characters | vocab {tokenizer.vocab_size} | "
        f"train {len(train_np):,} / val {len(val_np):,} tokens")
  print(f"model: {model_config.n_layer} layers, {model_config.n_head} heads, "
        f"n_embd {model_config.n_embd}, block {model_config.block_size}, dropout "
        f"{model_config.dropout} | {n_params:,} parameters")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} | batch "
        f"{tc.batch_size} x {model_config.block_size} = {tokens_per_step:,} tokens/step | "
        f"workdir: {workdir}", flush=True)

  get_batch = jax.jit(data.get_batch, static_argnums=(2, 3))
  step_fn = jax.jit(functools.partial(train_step, model_config=model_config,
                                      optimizer=optimizer), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_loss, model_config=model_config,
                                       batch_size=tc.batch_size, eval_iters=tc.eval_iters))

  def batch_for(step):
    return get_batch(train_tokens, jax.random.fold_in(stream(DATA_STREAM), step),
                     tc.batch_size, model_config.block_size)

  print("Compiling train step...", end=" ", flush=True)
  t0 = time.perf_counter()
  step_fn = step_fn.lower(state, batch_for(1), stream(DROPOUT_STREAM)).compile()
  print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)

  metrics_file = metrics.MetricsFile(workdir / "metrics.jsonl")
  eval_key = stream(EVAL_STREAM)  # The same eval windows every time: comparable estimates.
  best, last_record, status = None, None, "failed"
  run_start = time.perf_counter()
  mark_time, mark_step = time.perf_counter(), 0
  eval_seconds = 0.0
  stopper = _StopRequest()

  def record(step, step_metrics, with_eval):
    nonlocal best, mark_time, mark_step, eval_seconds, last_record
    now = time.perf_counter()
    loss = float(step_metrics["loss"])
    if not np.isfinite(loss):
      raise Diverged(f"Training diverged at iteration {step} (loss {loss}). "
                     "Try a lower --learning_rate or --grad_clip.")
    rec = {"iter": step, "train_loss": loss, "lr": float(schedule(step - 1)),
           "grad_norm": float(step_metrics["grad_norm"])}
    if step > mark_step:
      seconds_per_step = (now - mark_time) / (step - mark_step)
      rec["ms_per_iter"] = 1e3 * seconds_per_step
      rec["tokens_per_sec"] = tokens_per_step / seconds_per_step
    if with_eval:
      t_eval = time.perf_counter()
      rec["eval_train_loss"] = float(evaluate(state["params"], train_tokens,
                                              jax.random.fold_in(eval_key, 0)))
      rec["val_loss"] = float(evaluate(state["params"], val_tokens,
                                       jax.random.fold_in(eval_key, 1)))
      eval_seconds = time.perf_counter() - t_eval
      if best is None or rec["val_loss"] < best[0]:
        best = (rec["val_loss"], step)
    rec["wall_s"] = time.perf_counter() - run_start
    eta = None
    if "ms_per_iter" in rec:
      remaining = tc.iters - step
      evals_left = remaining // tc.eval_interval + (tc.iters % tc.eval_interval != 0)
      eta = remaining * rec["ms_per_iter"] / 1e3 + evals_left * eval_seconds
    metrics_file.write(rec)
    print(metrics.log_line(rec, best, eta), flush=True)
    last_record = rec
    mark_time, mark_step = time.perf_counter(), step

  pending = None  # Metrics of the last dispatched step, read one step behind.
  try:
    with stopper.installed():
      for step in range(1, tc.iters + 1):
        state, step_metrics = step_fn(state, batch_for(step),
                                      jax.random.fold_in(stream(DROPOUT_STREAM), step))
        if pending and (pending[0] % tc.log_interval == 0):
          record(*pending, with_eval=False)
        pending = (step, step_metrics)
        if step % tc.eval_interval == 0 or step == tc.iters or stopper.signum:
          record(step, step_metrics, with_eval=not stopper.signum)
          pending = None
        if stopper.signum:
          break
      status = "interrupted" if stopper.signum else "completed"
  except Diverged as e:
    status = "diverged"
    raise UserError(str(e)) from None
  finally:
    metrics_file.close()
    summary = {
        "status": status,
        "iters": last_record["iter"] if last_record else 0,
        "final_train_loss": last_record["train_loss"] if last_record else None,
        "final_val_loss": last_record.get("val_loss") if last_record else None,
        "best_val_loss": best[0] if best else None,
        "best_iter": best[1] if best else None,
        "tokens_per_sec": last_record.get("tokens_per_sec") if last_record else None,
        "wall_s": time.perf_counter() - run_start,
        "n_params": n_params,
    }
    metrics.write_json(workdir / "summary.json", summary)

  if stopper.signum:
    return summary | {"signal": stopper.signum}
  write_samples(state["params"], tokenizer, prompts, stream(SAMPLE_STREAM), model_config,
                config, workdir)
  return summary


def write_samples(params, tokenizer, prompts, key, model_config, config, workdir):
  print("Generating samples...", flush=True)
  with open(workdir / "samples.txt", "w", encoding="utf-8") as out:
    for i, prompt in enumerate(prompts):
      text = prompt + sample.complete(params, tokenizer, prompt, jax.random.fold_in(key, i),
                                      model_config, config.sample)
      print(f"\n{text}\n", flush=True)
      out.write(text + "\n\n")
