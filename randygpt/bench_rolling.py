"""The rolling key/value cache against re-running the window, on a trained --position=rope run:
`python -m randygpt.bench_rolling --workdir=runs/NAME`.

- Loss: the teacher-forced next-character loss at the positions past block_size of
  validation windows of 4 x block_size characters, computed both ways: re-running the last
  block_size characters for each position (what sampling does by default), and rolling the
  cache on (each position keeps the keys and values computed when it was added).
- Greedy decoding within the window: the cached text equals the uncached one.
- Speed: generated tokens/s, --max_new_tokens (500) from a one-character prompt, one stream,
  the two ways timed alternately (rolling, re-run, rolling, ...), --repeats of each.
Prints one JSON line.
"""

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

from absl import app
from absl import flags

from randygpt.runtime import cli, cores
from randygpt import flags as randygpt_flags
from randygpt import sample  # Its --checkpoint (a flag is defined once per process).
from randygpt.errors import UserError

flags.DEFINE_integer("windows", 32, "Validation windows of 4 x block_size for the losses.",
                     lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed generations of each kind.", lower_bound=1)
flags.adopt_module_key_flags(randygpt_flags)
flags.declare_key_flag("checkpoint")

WINDOW_BLOCKS = 4  # The loss windows' length, in block_size.


def past_window_losses(params, tokens_BxM, model_config) -> dict:
  """Mean loss at positions block_size..M-2 of each row (the next character as target):
  re-running the last block_size characters, and rolling the cache on."""
  import jax
  import jax.numpy as jnp
  import optax

  from randygpt import model
  batch, m = tokens_BxM.shape
  block = model_config.block_size
  positions = jnp.arange(block, m - 1)
  targets_BxR = tokens_BxM[:, block + 1:]

  @jax.jit
  def rerun(tokens_BxM):
    def at(p):  # The window of block_size characters that ends at p.
      window_BxT = jax.lax.dynamic_slice_in_dim(tokens_BxM, p - block + 1, block, axis=1)
      return model.forward(params, window_BxT, model_config)[:, -1]
    return jax.lax.map(at, positions).swapaxes(0, 1)

  @jax.jit
  def rolling(tokens_BxM):
    def step(cache, p):
      logits_Bx1xV, cache = model.forward_cached(params, tokens_BxM[:, p, None], cache, p,
                                                 model_config)
      return cache, logits_Bx1xV[:, 0]
    _, logits_MxBxV = jax.lax.scan(step, model.init_cache(model_config, batch), jnp.arange(m - 1))
    return logits_MxBxV[block:].swapaxes(0, 1)

  def loss(logits_BxRxV):
    return float(optax.softmax_cross_entropy_with_integer_labels(logits_BxRxV, targets_BxR).mean())

  return {"rerun_window_loss": loss(rerun(tokens_BxM)),
          "rolling_cache_loss": loss(rolling(tokens_BxM))}


def measure(params, val_tokens, model_config, sample_config, n_windows: int, repeats: int) -> dict:
  import jax
  import numpy as np

  from randygpt import generate
  block = model_config.block_size
  m = WINDOW_BLOCKS * block + 1
  starts = np.linspace(0, len(val_tokens) - m, n_windows).astype(int)
  tokens_BxM = np.stack([val_tokens[s:s + m] for s in starts]).astype(np.int32)
  results = {"windows": n_windows, "window_chars": m - 1,
             **past_window_losses(params, tokens_BxM, model_config)}

  # Greedy within the window: cached (the prompt prefilled) against uncached.
  prompt_1xP = tokens_BxM[:1, :8]
  greedy = dataclasses.replace(sample_config, temperature=0.0, max_new_tokens=block - 8)
  texts = [np.asarray(generate.generate(params, prompt_1xP, jax.random.key(0), model_config,
                                        greedy, use_cache=c)) for c in (True, False)]
  results["greedy_within_window_equal"] = bool((texts[0] == texts[1]).all())

  prompt_1x1 = np.zeros((1, 1), np.int32)
  seconds = {"rolling": [], "rerun": []}
  runs = {kind: functools.partial(
      generate.generate, params, prompt_1x1, model_config=model_config,
      sample_config=dataclasses.replace(sample_config, rolling_cache=kind == "rolling"))
      for kind in seconds}
  for run in runs.values():
    jax.block_until_ready(run(jax.random.key(0)))  # Compiles.
  for i in range(repeats):
    for kind, run in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run(jax.random.key(i + 1)))
      seconds[kind].append(time.perf_counter() - start)
  n_new = sample_config.max_new_tokens
  for kind, times in seconds.items():
    rates = [n_new / s for s in times]
    results[f"{kind}_tokens_per_sec"] = {"median": float(np.median(rates)),
                                         "p10": float(np.percentile(rates, 10)),
                                         "p90": float(np.percentile(rates, 90))}
  results["speedup_median"] = (results["rolling_tokens_per_sec"]["median"]
                               / results["rerun_tokens_per_sec"]["median"])
  results["new_tokens"] = n_new
  results["load_average"] = os.getloadavg()
  return results


def bench_rolling():
  import jax
  import numpy as np

  from randygpt import checkpoint, data, train
  config = randygpt_flags.run_config()
  path, meta, saved = sample.open_checkpoint(flags.FLAGS.checkpoint,
                                             Path(config.location.workdir))
  if saved.model.position != "rope":
    raise UserError(f"{path} was trained with --position={saved.model.position}: the rolling "
                    "cache needs a --position=rope run.")
  corpus = data.load_corpus(saved.data.data, cli.cache_dir("tokens"),
                            encoding=saved.data.data_encoding, tokenizer=saved.data.tokenizer,
                            bpe_vocab_size=saved.data.bpe_vocab_size,
                            hash_threads=cores.usable().cpus)
  checkpoint.check_vocab(meta["vocab"], corpus.tokenizer, path, saved.data.data)
  _, val_tokens = corpus.split(saved.model.block_size)
  val_tokens = np.asarray(val_tokens)
  model_config = dataclasses.replace(saved.model, vocab_size=corpus.tokenizer.vocab_size)
  state = checkpoint.restore_train_state(
      path, model_config, saved.train, jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))
  sample_config = dataclasses.replace(
      config.sample, max_new_tokens=(config.sample.max_new_tokens
                                     if "max_new_tokens" in config.explicit else 500))
  results = measure(train.eval_params(state), val_tokens, model_config, sample_config,
                    flags.FLAGS.windows, flags.FLAGS.repeats)
  print(json.dumps({"checkpoint": str(path), **results}))


if __name__ == "__main__":
  app.run(cli.entry_point(bench_rolling), flags_parser=cli.parse_flags)
