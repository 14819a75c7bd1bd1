"""Sample from a trained run without retraining:
`python -m randygpt.sample --workdir=runs/x [--checkpoint=best|latest|PATH] --prompt=...`.

The model shape, vocabulary and seed come from the checkpoint alone; the training text is
not needed. With the run's seed (the default), the samples match the run's samples.txt.
"""

from pathlib import Path

from absl import app
from absl import flags

from randygpt.runtime import cli
from randygpt import flags as randygpt_flags

flags.DEFINE_string("checkpoint", "", "best, latest, or a checkpoint path (a step directory "
                    "or a workdir); default: the best checkpoint, else the latest.")
for _name in ("workdir", "prompt", "max_new_tokens", "num_samples", "temperature", "top_p",
              "top_k", "rolling_cache", "seed", "eval_platform"):
  flags.declare_key_flag(_name, flag_values=flags.FLAGS)


def open_checkpoint(spec: str, workdir: Path):
  """The checkpoint `spec` names (default: the best, else the latest), its metadata and its
  run's config."""
  from randygpt import checkpoint
  from randygpt.config import RunConfig
  if not spec:
    spec = "best" if "best" in checkpoint.Checkpoints(workdir).existing() else "latest"
  path = checkpoint.resolve(spec, workdir)
  meta = checkpoint.read_meta(path)
  return path, meta, RunConfig.from_flags(meta["config"])


def sample_from_checkpoint(spec: str, config, place=None, executor=None) -> None:
  """Prints samples of the checkpoint `spec` names. `place` chooses the evaluation device from
  the flags; `executor` runs the work sent to an accelerator (runtime/fallback.py)."""
  import jax

  from randygpt import checkpoint, data, generate, train
  from randygpt.runtime import fallback, footprint, platforms

  path, meta, saved = open_checkpoint(spec, Path(config.location.workdir))
  tokenizer = checkpoint.saved_tokenizer(meta)
  prompts = generate.check_prompts(config.sample.prompt, tokenizer)
  model_config = saved.replace(vocab_size=tokenizer.vocab_size).model
  footprint.check(model_config, config.sample)
  placement = (place or platforms.place)("cpu", config.location.eval_platform)
  # Restored on the CPU, from where the sampler copies the weights to its device (and again
  # to the CPU should that device fail).
  cpu = platforms.cpu_device()
  with jax.default_device(cpu):
    state = checkpoint.restore_train_state(path, model_config, saved.train,
                                           jax.sharding.SingleDeviceSharding(cpu))
    sampler = fallback.GuardedEvaluator(placement.eval_device, model_config, config.sample,
                                        executor=executor or fallback.run_plainly,
                                        platform=placement.eval_platform)
    placement = sampler.probe(train.eval_params(state), placement)
    for note in placement.notes:
      print(note)
    seed = config.train.seed if "seed" in config.explicit else saved.train.seed
    print(f"checkpoint: {path} (iteration {meta['iter']}; best val loss so far "
          f"{meta['best_val_loss']})")
    sampler.write_samples(train.eval_params(state), tokenizer, prompts, seed)


def sample():
  sample_from_checkpoint(flags.FLAGS.checkpoint, randygpt_flags.run_config())


if __name__ == "__main__":
  app.run(cli.entry_point(sample), flags_parser=cli.parse_flags)
