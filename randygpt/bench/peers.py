"""The PyTorch peers randygpt is timed beside: randygpt/torch_reference.py (the same model in
PyTorch eager, in this process) and nanoGPT's own train.py (through --nanogpt_script,
tools/nanogpt-bench.sh by default)."""

import os
import subprocess
import sys

from randygpt.errors import UserError


def check_torch_comparable(config) -> None:
  """torch_reference.py is randyGPT's architecture with AdamW: refuses a config with levers."""
  levers = [f"--{name}" for name, on in (
      ("position", config.model.position != "learned"), ("qk_norm", config.model.qk_norm),
      ("final_norm", config.model.final_norm), ("logit_softcap", config.model.logit_softcap),
      ("zero_init", config.model.zero_init), ("optimizer", config.train.optimizer != "adamw"))
      if on]
  if levers:
    raise UserError(f"--torch times randyGPT's architecture with AdamW, not {', '.join(levers)}: "
                    "drop those flags or --torch.")


def torch_reference_timing(model_config, tc, tokens, steps: int, warmup_steps: int,
                           tokens_per_sec: float) -> dict:
  """torch_reference's train step timed as randygpt's is, and randygpt's speed-up over it."""
  import numpy as np
  try:
    from randygpt import torch_reference
  except ImportError:
    raise UserError("--torch needs PyTorch: pip install torch==2.13.0") from None
  reference = torch_reference.measure(model_config, tc, np.asarray(tokens), steps,
                                      warmup_steps)
  reference["speedup_vs_torch"] = tokens_per_sec / reference["torch_tokens_per_sec"]
  return reference


def prepare_nanogpt(script: str, git: str) -> None:
  """The nanoGPT script's one-time work (its checkout, from `git` if given, and its data) done
  before any timing, and its environment for the timings: this interpreter (it has torch)."""
  if not os.access(script, os.X_OK):
    raise UserError(f"--nanogpt_script={script} is not an executable script; "
                    "--nanogpt_iters=0 leaves nanoGPT out.")
  os.environ.setdefault("NANOGPT_PYTHON", sys.executable)
  if git:
    os.environ["NANOGPT_GIT"] = git
  done = subprocess.run([script, "--prepare"], capture_output=True, text=True)
  if done.returncode:
    raise UserError(f"The nanoGPT timing failed ({script}): "
                    f"{(done.stdout + done.stderr).strip()[-300:]}")


def nanogpt_ms(script: str, config, iters: int, wrap=list, env: dict | None = None) -> float:
  """nanoGPT's train.py median ms/iteration at this shape, from the script (its
  command line through `wrap`, e.g. pinned to some cores; its environment `env`)."""
  mc, tc = config.model, config.train
  done = subprocess.run(wrap([script, *map(str, (mc.n_layer, mc.n_head, mc.n_embd,
                                                 mc.block_size, tc.batch_size, mc.dropout,
                                                 iters))]),
                        capture_output=True, text=True, env=env)
  words = done.stdout.split()
  if done.returncode or "median" not in words:
    raise UserError(f"The nanoGPT timing failed ({script}): "
                    f"{(done.stdout + done.stderr).strip()[-300:]}")
  return float(words[words.index("median") + 1])
