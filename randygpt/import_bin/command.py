"""The import: read and check the file, rebuild the vocabulary, write the new run."""

import dataclasses
from pathlib import Path

from randygpt import model, optim, train
from randygpt import flags as randygpt_flags
from randygpt.errors import UserError
from randygpt.import_bin.formats import check_size, file_format, read_header, read_tensors
from randygpt.import_bin.state import RANDYGPT_BETAS, train_state, write_run
from randygpt.import_bin.vocab import (describe, import_data_config, read_vocabulary,
                                       recorded_data_config)

USAGE = ("python -m randygpt.import_bin checkpoint.bin --data=train.txt --workdir=DIR "
         "[--bpe_vocab=vocab.json] [--n_embd= --n_layer= --n_head= --block_size=]")


def import_bin(args: list[str]) -> None:
  if len(args) != 1:
    raise UserError(f"Give one randyGPT checkpoint file: {USAGE}")
  path = Path(args[0]).expanduser()
  config = randygpt_flags.run_config()
  header = read_header(path)
  fmt = file_format(header)
  model_config = dataclasses.replace(config.model, vocab_size=int(header["vocab_size"]))
  check_size(path, model_config, fmt)
  config = dataclasses.replace(config, data=import_data_config(config.data))
  corpus = read_vocabulary(config.data, path, model_config)

  iteration = int(header["iter"]) + 1  # randyGPT counts from 0, randygpt from 1.
  train_config = dataclasses.replace(
      config.train, iters=iteration,
      **{k: v for k, v in RANDYGPT_BETAS.items() if k not in config.explicit})
  config = dataclasses.replace(config, train=train_config,
                               data=recorded_data_config(config.data))
  params, mu, nu = read_tensors(path, model_config, fmt)
  # Only the structure of its state is used: the schedule is that of the resumed run.
  state = train_state(params, mu, nu, step=int(header["step"]), iteration=iteration,
                      optimizer=optim.make_optimizer(train_config))
  if train_config.ema_decay:  # The state a run of these flags resumes: its average too.
    state = train.with_average(state)
  source = {"path": str(path), "format": fmt.name, "iter": int(header["iter"]),
            "step": int(header["step"]), "best_loss": float(header["best_loss"])}

  print(f"randyGPT checkpoint: {path} ({fmt.name}, {fmt.written_by}) | iteration "
        f"{source['iter']} (from 0), Adam step {source['step']}, best loss "
        f"{source['best_loss']:.4f}")
  if mu is None:
    print(f"{fmt.name} keeps no Adam moments: they start at zero, with Adam step "
          f"{source['step']} carried, as randyGPT's own resume of it does.")
  print(describe(config.data, corpus))
  print(f"model: {model_config.n_layer} layers, {model_config.n_head} heads, n_embd "
        f"{model_config.n_embd}, block {model_config.block_size} | "
        f"{model.n_params(model_config):,} parameters")
  workdir = Path(config.location.workdir)
  latest = write_run(workdir, config, corpus, state, iteration, source, model_config)
  print(f"Saved latest checkpoint: {latest} (iteration {iteration})")
  print(f"Resume: python -m randygpt.main --resume --workdir={workdir} "
        f"--iters={iteration + 1000}  (any target above {iteration})")
  print(f"Sample: python -m randygpt.sample --workdir={workdir}")
