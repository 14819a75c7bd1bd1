"""The import: read and check the file, rebuild the vocabulary, write the new run."""

import dataclasses
from pathlib import Path

from randygpt import model, optim
from randygpt import flags as randygpt_flags
from randygpt.errors import UserError
from randygpt.import_bin.formats import MAGIC, check_size, read_header, read_tensors
from randygpt.import_bin.state import RANDYGPT_BETAS, train_state, write_run
from randygpt.import_bin.vocab import read_vocabulary

USAGE = ("python -m randygpt.import_bin checkpoint.bin --data=train.txt --workdir=DIR "
         "[--n_embd= --n_layer= --n_head= --block_size=]")


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
