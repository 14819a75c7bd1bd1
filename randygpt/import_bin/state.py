"""The imported state: randygpt's train state holding randyGPT's weights and Adam moments,
and the new run that holds it."""

from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from randygpt import data, metrics, model
from randygpt.config import ModelConfig
from randygpt.runtime import rundir

# randyGPT's Adam betas: the moments in the file were averaged with them.
RANDYGPT_BETAS = {"beta1": 0.9, "beta2": 0.999}


def train_state(params, mu, nu, *, step: int, iteration: int,
                optimizer: optax.GradientTransformation) -> dict:
  """randygpt's train state `{params, opt}` holding the imported weights and moments (zeros
  where `mu` and `nu` are None).

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
      if mu is None:  # No moments in the file: optax's zeros.
        return s._replace(count=jnp.asarray(step, s.count.dtype))
      return s._replace(count=jnp.asarray(step, s.count.dtype),
                        mu=jax.tree.map(jnp.asarray, mu), nu=jax.tree.map(jnp.asarray, nu))
    return s._replace(count=jnp.asarray(iteration, s.count.dtype))

  opt = jax.tree.map(fill, opt, is_leaf=is_state)
  # randygpt's optimizer has one of each; another chain would need its own mapping.
  assert sorted(t.__name__ for t in found) == ["ScaleByAdamState", "ScaleByScheduleState"]
  return {"params": jax.tree.map(jnp.asarray, params), "opt": opt}


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
