"""Bring a randyGPT (Rust) checkpoint along:
`python -m randygpt.import_bin checkpoint.bin --data=train.txt --workdir=runs/imported`.

Reads randyGPT v0.5's RGPT0001 file (weights, Adam moments, iteration and Adam step) and
writes a randygpt checkpoint that `--resume` continues and `randygpt.sample` samples from.
The file does not store the model shape: it comes from --n_embd, --n_layer, --n_head and
--block_size (randyGPT's defaults are randygpt's), and the file size must add up to it.
"""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags

from randygpt import data, metrics, model, optim
from randygpt.runtime import cli, cores, rundir
from randygpt import flags as randygpt_flags
from randygpt.config import ModelConfig
from randygpt.errors import UserError

for _name in ("data", "data_encoding", "workdir", "overwrite", "n_embd", "n_head", "n_layer",
              "block_size", "beta1", "beta2", "learning_rate"):
  flags.declare_key_flag(_name, flag_values=flags.FLAGS)

MAGIC = b"RGPT0001"
HEADER_BYTES = 24
BYTES_PER_PARAM = 12  # The weight and its two Adam moments, f32 each.
# randyGPT's Adam betas: the moments in the file were averaged with them.
RANDYGPT_BETAS = {"beta1": 0.9, "beta2": 0.999}
USAGE = ("python -m randygpt.import_bin checkpoint.bin --data=train.txt --workdir=DIR "
         "[--n_embd= --n_layer= --n_head= --block_size=]")


def tensor_shapes(model_config: ModelConfig) -> list[tuple[int, int]]:
  """randyGPT's weight matrices in file order, each [n_out, n_in]."""
  v, e, block = model_config.vocab_size, model_config.n_embd, model_config.block_size
  layer = [(e, e)] * 4 + [(4 * e, e), (e, 4 * e)]  # wq, wk, wv, wo, fc1, fc2.
  return [(v, e), (block, e), (v, e)] + layer * model_config.n_layer


def _shape_flags(n_embd: int, n_layer: int, block_size: int) -> str:
  return f"--n_embd={n_embd} --n_layer={n_layer} --block_size={block_size}"


def shapes_that_fit(count: int, vocab_size: int, like: ModelConfig, limit: int = 5) -> list[tuple]:
  """(n_embd, n_layer, block_size) with exactly `count` parameters, for block sizes that are
  powers of two (or `like`'s) and up to 64 layers; those closest to `like` first."""
  found = []
  for block in sorted({like.block_size, *(2**i for i in range(3, 13))}):
    for layer in range(1, 65):
      # Solve 12*layer*e^2 + (2*vocab_size + block)*e = count for a whole e.
      b = 2 * vocab_size + block
      e = round((math.sqrt(b * b + 48 * layer * count) - b) / (24 * layer))
      shape = ModelConfig(vocab_size=vocab_size, n_embd=e, n_layer=layer, block_size=block)
      if e > 0 and model.n_params(shape) == count:
        found.append((e, layer, block))
  given = (like.n_embd, like.n_layer, like.block_size)
  return sorted(found, key=lambda s: (sum(a != b for a, b in zip(s, given)), s))[:limit]


def read_header(path: Path) -> np.void:
  """The 24-byte header as a NumPy record (magic, vocab_size, iter, step, best_loss)."""
  try:
    with open(path, "rb") as f:
      raw = f.read(HEADER_BYTES)
  except OSError as e:
    raise UserError(f"Cannot read {path}: {e.strerror}.") from None
  if raw[:8] != MAGIC and not (len(raw) < len(MAGIC) and MAGIC.startswith(raw)):
    raise UserError(f"Bad magic bytes in checkpoint {path} (expected {MAGIC.decode()}, found "
                    f"{raw[:8]!r}): only randyGPT v0.5's RGPT0001 format can be imported.")
  if len(raw) < HEADER_BYTES:
    raise UserError(f"{path} is truncated: {len(raw)} bytes, less than the "
                    f"{HEADER_BYTES}-byte header.")
  header_dtype = np.dtype([("magic", "S8"), ("vocab_size", "<u4"), ("iter", "<u4"),
                           ("step", "<u4"), ("best_loss", "<f4")])
  return np.frombuffer(raw, dtype=header_dtype)[0]


def check_size(path: Path, model_config: ModelConfig) -> None:
  """Refuses a file whose size is not that of `model_config`'s shape, naming shapes that fit."""
  c = model_config
  size = path.stat().st_size
  expected = HEADER_BYTES + BYTES_PER_PARAM * model.n_params(c)
  if size == expected:
    return
  shape = f"{_shape_flags(c.n_embd, c.n_layer, c.block_size)} (vocab_size {c.vocab_size})"
  count, rest = divmod(size - HEADER_BYTES, BYTES_PER_PARAM)
  fits = [] if rest else shapes_that_fit(count, c.vocab_size, c)
  if fits:
    maybe_cut = " (or the file is truncated)" if size < expected else ""
    raise UserError(
        f"{path} has {size:,} bytes, but the shape {shape} needs {expected:,}{maybe_cut}. "
        f"Shapes that fit: {'; '.join(_shape_flags(*s) for s in fits)}. Pass the shape "
        "randyGPT trained with (and an --n_head that divides --n_embd).")
  if size < expected:
    raise UserError(f"{path} is truncated: {size:,} bytes, but a checkpoint of the shape "
                    f"{shape} has {expected:,}.")
  raise UserError(f"{path} has {size:,} bytes, more than the {expected:,} of the shape {shape}, "
                  "and no other shape fits: it is not a whole RGPT0001 checkpoint.")


def to_params(arrays: list, n_layer: int) -> dict:
  """randygpt's parameter tree from randyGPT's matrices in file order. randyGPT applies
  W[n_out, n_in] as W·x and randygpt as x @ W, so every projection is transposed; wq, wk
  and wv become wqkv's q, k and v columns (head h at columns h*head_dim onwards of each)."""
  it = iter(arrays)
  wte, wpe, lm_head = next(it), next(it), next(it)
  blocks = []
  for _ in range(n_layer):
    wq, wk, wv, wo, fc1, fc2 = (next(it) for _ in range(6))
    blocks.append({"attn": {"wqkv": np.concatenate([wq.T, wk.T, wv.T], axis=1), "wo": wo.T},
                   "mlp": {"w1": fc1.T, "w2": fc2.T}})
  stacked = jax.tree.map(lambda *layers: np.stack(layers), *blocks)  # As model.init_params.
  return {"wte": wte, "wpe": wpe, "lm_head": lm_head.T, "blocks": stacked}


def read_tensors(path: Path, model_config: ModelConfig) -> tuple[dict, dict, dict]:
  """The weights and the Adam moments m and v of a size-checked file, each as a randygpt
  parameter tree of NumPy arrays."""
  shapes = tensor_shapes(model_config)
  # The weights, then an (m, v) pair for each weight in the same order.
  in_file = shapes + [s for s in shapes for _ in range(2)]
  flat = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
  pieces = np.split(flat, np.cumsum([r * c for r, c in in_file])[:-1])
  arrays = [p.reshape(s) for p, s in zip(pieces, in_file)]
  n = len(shapes)
  return tuple(to_params(a, model_config.n_layer)
               for a in (arrays[:n], arrays[n::2], arrays[n + 1::2]))


def train_state(params, mu, nu, *, step: int, iteration: int,
                optimizer: optax.GradientTransformation) -> dict:
  """randygpt's train state `{params, opt}` holding the imported weights and moments.

  randyGPT counts its Adam updates in `step` and bias-corrects update t with 1 - beta^t;
  optax corrects the update after `count` with count + 1. So Adam's count is `step`, and the
  next update is corrected exactly as randyGPT's next would be. The learning-rate schedule's
  count is `iteration`, the iterations done, as in a native run at that iteration.
  """
  opt = optimizer.init(params)
  is_state = lambda s: isinstance(s, (optax.ScaleByAdamState, optax.ScaleByScheduleState))
  found = []

  def fill(s):
    if not is_state(s):
      return s
    found.append(type(s))
    if isinstance(s, optax.ScaleByAdamState):
      return s._replace(count=jnp.asarray(step, s.count.dtype),
                        mu=jax.tree.map(jnp.asarray, mu), nu=jax.tree.map(jnp.asarray, nu))
    return s._replace(count=jnp.asarray(iteration, s.count.dtype))

  opt = jax.tree.map(fill, opt, is_leaf=is_state)
  # randygpt's optimizer has one of each; another chain would need its own mapping.
  assert sorted(t.__name__ for t in found) == ["ScaleByAdamState", "ScaleByScheduleState"]
  return {"params": jax.tree.map(jnp.asarray, params), "opt": opt}


def read_vocabulary(config, path: Path, model_config: ModelConfig) -> data.Corpus:
  """The text randyGPT trained on, as it read it, and its vocabulary (checked against the
  checkpoint's size)."""
  corpus = data.load_corpus(config.data.data, cli.cache_dir("tokens"),
                            encoding=config.data.data_encoding, tokenizer="randygpt",
                            sample_fallback=False, hash_threads=cores.usable().cpus)
  tokenizer = corpus.tokenizer
  if tokenizer.vocab_size != model_config.vocab_size:
    raise UserError(
        f"Checkpoint vocab_size {model_config.vocab_size} != vocab_size "
        f"{tokenizer.vocab_size} of --data={config.data.data} ('<', '>' and its "
        f"{tokenizer.vocab_size - 2} distinct characters): {path} was trained on other text. "
        "Pass the train.txt randyGPT trained it on.")
  return corpus


def write_run(workdir: Path, config, corpus: data.Corpus, state, iteration: int, source: dict,
              model_config: ModelConfig) -> Path:
  """A new run in `workdir` whose latest checkpoint is the imported state; returns it."""
  from randygpt import checkpoint  # Imports Orbax: after flag parsing, --help stays fast.
  with rundir.claim(workdir):
    _, discard = checkpoint.plan_start(workdir, False, "", config.location.overwrite)
    # The import begins the run's history.
    rundir.initialise(workdir, config, corpus.tokenizer, iteration, discard, new_history=True,
                      data=corpus.fingerprint)
    checkpoints = checkpoint.Checkpoints(workdir)
    checkpoints.save("latest", iteration, state, checkpoint.make_meta(
        iteration, None, corpus.tokenizer, config, imported_from=source,
        data=corpus.fingerprint))
    checkpoints.wait()
    checkpoints.close()
    metrics.write_json(workdir / "summary.json", {
        "status": "imported", "iters": iteration, "imported_from": source,
        "latest_checkpoint": str(checkpoints.path("latest")),
        "n_params": model.n_params(model_config)})
  return checkpoints.path("latest")


def import_bin(args: list[str]) -> None:
  if len(args) != 1:
    raise UserError(f"Give one randyGPT checkpoint file: {USAGE}")
  path = Path(args[0]).expanduser()
  config = randygpt_flags.run_config()
  header = read_header(path)
  model_config = dataclasses.replace(config.model, vocab_size=int(header["vocab_size"]))
  check_size(path, model_config)
  corpus = read_vocabulary(config, path, model_config)
  tokenizer = corpus.tokenizer

  iteration = int(header["iter"]) + 1  # randyGPT counts from 0, randygpt from 1.
  train_config = dataclasses.replace(
      config.train, iters=iteration,
      **{k: v for k, v in RANDYGPT_BETAS.items() if k not in config.explicit})
  config = dataclasses.replace(
      config, train=train_config,
      data=dataclasses.replace(config.data, tokenizer="randygpt"))
  params, mu, nu = read_tensors(path, model_config)
  # Only the structure of its state is used: the schedule is that of the resumed run.
  state = train_state(params, mu, nu, step=int(header["step"]), iteration=iteration,
                      optimizer=optim.make_optimizer(train_config))
  source = {"path": str(path), "format": MAGIC.decode(), "iter": int(header["iter"]),
            "step": int(header["step"]), "best_loss": float(header["best_loss"])}

  print(f"randyGPT checkpoint: {path} | iteration {source['iter']} (from 0), Adam step "
        f"{source['step']}, best batch loss {source['best_loss']:.4f}")
  print(f"data: {config.data.data} | {len(corpus.tokens):,} characters | vocab "
        f"{tokenizer.vocab_size} ('<', '>' and {tokenizer.vocab_size - 2} characters)")
  print(f"model: {model_config.n_layer} layers, {model_config.n_head} heads, n_embd "
        f"{model_config.n_embd}, block {model_config.block_size} | "
        f"{model.n_params(model_config):,} parameters")
  workdir = Path(config.location.workdir)
  latest = write_run(workdir, config, corpus, state, iteration, source, model_config)
  print(f"Saved latest checkpoint: {latest} (iteration {iteration})")
  print(f"Resume: python -m randygpt.main --resume --workdir={workdir} "
        f"--iters={iteration + 1000}  (any target above {iteration})")
  print(f"Sample: python -m randygpt.sample --workdir={workdir}")


def main(argv):
  cli.entry_point(lambda: import_bin(argv[1:]))(argv[:1])


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
