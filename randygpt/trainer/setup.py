"""A run's first stage: `prepare(config) -> Setup`, everything fixed before the first step.

Where the run starts (fresh or from a checkpoint), the text and its tokens, the one
`resolve` step that gives the run's final config (vocabulary, schedule horizon, placement),
the initial state and the jitted functions; the header that says what was chosen.
"""

import dataclasses
from pathlib import Path
from typing import Callable

import jax

from randygpt import checkpoint, data, evaluate, generate, model, optim, sharding, train
from randygpt.config import RunConfig, parse_duration
from randygpt.errors import UserError
from randygpt.runtime import (cli, cores, devices, exported, fallback, footprint, placement,
                              platforms, rundir)
from randygpt.trainer import budget


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run fixes before its first step."""
  config: RunConfig  # Resolved: vocabulary, schedule horizon and placement filled in.
  start_iter: int
  source: Path | None  # The checkpoint the run resumes from.
  best: tuple[float, int] | None  # (val loss, iteration) of the best evaluation so far.
  tokenizer: data.CharTokenizer | data.BpeTokenizer | data.RandygptBpeTokenizer
  prompts: tuple[str, ...]
  plan: placement.Plan  # The devices that train and evaluate, and why.
  state: dict  # The initial train state, replicated over the mesh.
  corpus: data.Corpus
  sampler: data.WindowSampler  # step -> the step's windows (inputs, targets) on the host.
  step_fn: Callable  # (state, batch, rng) -> (state, metrics), jitted, the state donated.
  evaluator: fallback.GuardedEvaluator
  calibration: budget.Calibration | None = None  # What a --time_budget measured and chose.

  @property
  def workdir(self) -> Path:
    return Path(self.config.location.workdir)

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.plan.mesh


def _start(config: RunConfig):
  """The run's config (the checkpoint's flags on a resume), the checkpoint it starts from,
  its metadata, and the checkpoints a fresh start or a fork discards."""
  loc = config.location
  source, discard = checkpoint.plan_start(Path(loc.workdir), loc.resume, loc.resume_from,
                                          loc.overwrite)
  meta = checkpoint.read_meta(source) if source else None
  if meta:
    config = config.resumed(meta["config"], str(source))
    if loc.time_budget:  # Spent at the first start, as its --iters.
      config = config.replace(iters=meta["config"]["iters"])
      print(f"--time_budget={loc.time_budget} is not timed again on a resume: the run keeps "
            f"the target of its checkpoint, iteration {config.train.iters}.")
  return config, source, meta, discard


def resolve(config: RunConfig, vocab_size: int, *, resumed: bool,
            place=platforms.place) -> tuple[RunConfig, placement.Plan]:
  """The run's final config, used everywhere after it: the vocabulary's size, the schedule's
  horizon (fixed at the first start, then kept in checkpoints) and the placement's counts
  filled in; and the placement's plan."""
  config = config.replace(vocab_size=vocab_size,
                          lr_decay_iters=optim.decay_horizon(config.train))
  return placement.plan(config, resumed=resumed, place=place)


def read_text(config: RunConfig, meta: dict | None = None, source: Path | None = None):
  """The text's tokens, and its {"train", "val"} splits."""
  dc = config.data
  corpus = data.load_corpus(dc.data, cli.cache_dir("tokens"), url=dc.data_url,
                            encoding=dc.data_encoding, tokenizer=dc.tokenizer,
                            bpe_vocab_size=dc.bpe_vocab_size, bpe_vocab=dc.bpe_vocab,
                            hash_threads=cores.usable().cpus)
  if meta:
    checkpoint.check_vocab(meta["vocab"], corpus.tokenizer, source, dc.data)
    if meta.get("data", {}).get("files") not in (None, corpus.fingerprint["files"]):
      print(f"⚠ --data={dc.data} is not the text {source} was trained on (same vocabulary, "
            "other content): training continues on this text.")
  train_np, val_np = corpus.split(config.model.block_size)
  return corpus, {"train": train_np, "val": val_np}


def initial_state(key: jax.Array, config: RunConfig, source: Path | None,
                  state_sharding: jax.sharding.Sharding) -> dict:
  """A fresh train state, or the one saved at `source`, placed with `state_sharding`."""
  if source is not None:
    return checkpoint.restore_train_state(source, config.model, config.train, state_sharding)
  # One jitted init: eager ops would each compile and stay cached.
  init = jax.jit(train.state_initializer(config.model, config.train),
                 out_shardings=state_sharding)
  if state_sharding.is_fully_addressable:  # Placed for its kept lowering (one process only).
    key = jax.device_put(key, state_sharding)
  return exported.compile_kept(init, key)(key)


def stream_key(config: RunConfig, stream: int) -> jax.Array:
  """The key of one of the run's random streams (train.INIT_STREAM...)."""
  return jax.random.fold_in(jax.random.key(config.train.seed), stream)


def build_step(config: RunConfig, plan: placement.Plan, splits: dict,
               source: Path | None = None):
  """The run's initial state, its window sampler (step -> the step's windows on the host) and
  its jitted train step, for a resolved config: what the loop runs and the benchmark
  times."""
  mc, tc = config.model, config.train
  state = initial_state(stream_key(config, train.INIT_STREAM), config, source,
                        sharding.replicated(plan.mesh))
  sampler = data.WindowSampler(splits["train"], stream_key(config, train.DATA_STREAM),
                               tc.batch_size, mc.block_size, compile=exported.compile_kept)
  return state, sampler, jit_step(config, plan.mesh)


def jit_step(config: RunConfig, mesh):
  """The jitted train step of `config` on `mesh`."""
  return train.jit_train_step(config.model, config.train, mesh, config.train.microbatches)


def compile_step(step_fn, config: RunConfig, state: dict, batch, rng: jax.Array):
  """`step_fn` compiled for arguments like these, its lowering kept between runs."""
  return exported.compile_kept(step_fn, state, batch, rng, donate_argnums=(0,),
                               config_key=repr((config.model, config.train)))


def place_batch(windows, mesh: jax.sharding.Mesh):
  """A step's windows, split over the training devices."""
  return jax.device_put(windows, sharding.batch_sharded(mesh))


def place_state(config: RunConfig, plan: placement.Plan, splits: dict, source: Path | None,
                executor: fallback.Executor):
  """build_step, the state placed on the training devices (through `executor` on an
  accelerator); a device that fails to hold it (out of memory) ends the run in one line."""
  def work():
    return build_step(config, plan, splits, source)
  try:
    return fallback.on_training_devices(plan.placement, executor, "initial-state", work)
  except jax.errors.JaxRuntimeError as error:
    device = platforms.device_name(plan.mesh.devices.flat[0])
    raise UserError(f"Could not place the initial state on {device} "
                    f"({platforms.error_line(error)}). Choose a smaller model, or train on "
                    "the CPU: --train_platform=cpu.") from None


def prepare(config: RunConfig, place=platforms.place,
            executor: fallback.Executor = fallback.run_plainly) -> Setup | None:
  """Everything before the first step, the workdir readied and the header printed; None
  when the checkpoint is already at the target iteration. `place` chooses the devices from
  the flags; `executor` runs the work sent to an accelerator (runtime/fallback.py). Work
  placed nowhere in particular (random keys, the windows' draws) runs on the CPU, also where
  a plugin is JAX's default backend (jax-mps makes itself so): one that fails then drops out
  at the placement, with one line, instead of failing the start."""
  with jax.default_device(platforms.cpu_device()):
    return _prepare(config, place, executor)


def _prepare(config: RunConfig, place, executor: fallback.Executor) -> Setup | None:
  config, source, meta, discard = _start(config)
  start_iter = meta["iter"] if meta else 0
  if start_iter >= config.train.iters:
    print(f"Already at iteration {start_iter} (target {config.train.iters}). Nothing to "
          f"train. Pass a higher --iters to train further.")
    return None
  corpus, splits = read_text(config, meta, source)
  tokenizer = corpus.tokenizer
  prompts = generate.check_prompts(config.sample.prompt, tokenizer)
  horizon = config.train.lr_decay_iters  # As given: 0 lets a --time_budget choose it.
  config, plan = resolve(config, tokenizer.vocab_size, resumed=source is not None, place=place)
  built = place_state(config, plan, splits, source, executor)
  evaluator = fallback.GuardedEvaluator(
      plan.placement.eval_device, config.model, config.sample, splits,
      stream_key(config, train.EVAL_STREAM), config.train, executor,
      plan.placement.eval_platform)
  plan = dataclasses.replace(plan, placement=evaluator.probe(built[0]["params"], plan.placement))
  calibration = None
  if config.location.time_budget and source is None:
    config, built, calibration = calibrate(config, horizon, plan, splits, built, evaluator,
                                           executor)
  best = None
  if meta and meta["best_iter"] is not None:
    best = (meta["best_val_loss"], meta["best_iter"])
  if devices.is_main_process():
    rundir.initialise(Path(config.location.workdir), config, tokenizer, start_iter, discard,
                      note=calibration.comment() if calibration else None,
                      data=corpus.fingerprint, **budget.details(calibration))
  devices.sync("workdir ready")
  setup = Setup(config, start_iter, source, best, tokenizer, prompts, plan, built[0], corpus,
                built[1], built[2], evaluator, calibration)
  print_header(setup, splits)
  return setup


def calibrate(config: RunConfig, horizon: int, plan: placement.Plan, splits: dict, built,
              evaluator: fallback.GuardedEvaluator, executor: fallback.Executor):
  """--time_budget on a fresh start (trainer/budget.py): times the step `built` for the
  provisional horizon, an estimate and a copy of the state to the host. Returns the config
  with the iterations that fit (and as many for the horizon, unless `horizon`, the
  --lr_decay_iters given, fixes it), the state, sampler and step built anew for it (the
  timed steps' state is dropped), and the calibration."""
  budget_s = parse_duration(config.location.time_budget)
  print(f"Timing the train step for --time_budget={config.location.time_budget}...",
        flush=True)
  timed, evals, save_s = _measure(config, plan, built, evaluator, executor, budget_s)
  windows = len(evaluator.evaluator.full_val_starts())
  calibration = budget.choose(
      config.location.time_budget, budget_s, timed, evals, save_s,
      -(-windows // evaluate.eval_windows(config.train)), config.train, devices.from_process_0)
  config = config.replace(iters=calibration.iters, lr_decay_iters=horizon or calibration.iters)
  calibration = dataclasses.replace(
      calibration, decay_from_loop=budget.decay_timer(calibration, config.train) is not None)
  return config, place_state(config, plan, splits, None, executor), calibration


def _measure(config: RunConfig, plan: placement.Plan, built,
             evaluator: fallback.GuardedEvaluator, executor: fallback.Executor,
             budget_s: float) -> tuple[tuple[int, float], tuple[float, float], float]:
  """(steps timed, seconds per step), an estimate's seconds (compiled, then again) and a
  host copy's seconds, on the `built` state, which the steps consume."""
  state, sampler, step_fn = built
  key = stream_key(config, train.DROPOUT_STREAM)
  compiled = compile_step(step_fn, config, state, place_batch(sampler(1), plan.mesh), key)

  def step_once(state: dict, step: int):
    def work():
      return compiled(state, place_batch(sampler(step), plan.mesh),
                      jax.random.fold_in(key, step))
    return fallback.on_training_devices(plan.placement, executor, "train-step", work)
  state, *timed = budget.time_steps(step_once, state, budget_s)
  evals = tuple(budget.seconds_of(lambda: evaluator(train.eval_params(state))) for _ in range(2))
  return tuple(timed), evals, budget.seconds_of(lambda: jax.device_get(state))


def print_header(setup: Setup, splits: dict) -> None:
  mc, corpus = setup.config.model, setup.corpus
  chars = sum(corpus.text_chars)
  size = (f"{chars:,} characters" if chars == len(corpus.tokens)
          else f"{len(corpus.tokens):,} tokens of {chars:,} characters")
  print(f"data: {corpus.description} | {size} | vocab "
        f"{mc.vocab_size} | train {len(splits['train']):,} / val {len(splits['val']):,} tokens")
  how = f"built in {corpus.built_s:.1f}s" if corpus.built_s is not None else "reused"
  size = footprint.human_bytes(corpus.cache_path.stat().st_size)
  print(f"token cache: {corpus.cache_path} ({size}, {corpus.tokens.dtype.name}, {how})")
  print(f"model: {mc.n_layer} layers, {mc.n_head} heads, n_embd {mc.n_embd}, block "
        f"{mc.block_size}, dropout {mc.dropout} | {model.n_params(mc):,} parameters")
  print(placement.devices_line(setup.config, setup.plan, setup.workdir))
  for note in setup.plan.placement.notes:
    print(note)
  if setup.calibration:
    print(setup.calibration.line())
  if setup.source:
    tc = setup.config.train
    print(f"Resumed from {setup.source} at iteration {setup.start_iter} (target {tc.iters}, "
          f"learning rate horizon {tc.lr_decay_iters}).")
