"""Checkpoints: two Orbax managers per workdir, `checkpoints/latest/<iter>` and
`checkpoints/best/<iter>`, each keeping one step.

A checkpoint holds the train state `{params, opt}` (the optax state includes the Adam
moments and the schedule's step count; under --ema_decay `ema` too) and JSON metadata: the
iteration, the best val loss so far, the vocabulary and the run's flags, seed and
learning-rate horizon included. The data windows and dropout masks are pure functions of
(seed, iteration), so these are the whole random state. Orbax writes to a temporary
directory and renames it when complete, so a killed save never leaves something that looks
like a checkpoint; every file and directory of a save reaches the disk before the rename and
before the previous step is removed (_Durable), so a power cut leaves one or the other whole.
"""

import asyncio
import contextlib
import importlib.metadata
import io
import os
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from randygpt import checksums, data, train
from randygpt.errors import UserError, write_advice

KINDS = ("latest", "best")
FORMAT_NAME = "randygpt-checkpoint"
# Format 4 may hold the weights' moving average beside them (--ema_decay, train.py); format 3
# adds the arrays' checksums to the metadata (checksums.py); format 2 stacks the blocks'
# weights by layer (model.py), and is read without the check; format 1 held a list of blocks.
FORMAT = f"{FORMAT_NAME}-4"
READS = (f"{FORMAT_NAME}-2", f"{FORMAT_NAME}-3", FORMAT)


def fsync(*paths: Path) -> None:
  """Flushes each file or directory (its entries: names created, renamed, removed) to disk."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


class _Durable(atomicity.AtomicRenameTemporaryPath):
  """Orbax's rename of a finished save, with the fsyncs it lacks: tensorstore syncs the
  data files it writes (its `file_io_sync`, on by default); Orbax syncs neither its metadata
  files nor a directory, so a power cut after the rename could leave the name without its
  content. Everything below the temporary directory is synced before the rename, the files
  Orbax writes while finalising and the renamed entry after it."""

  async def finalize(self, *args, **kwargs):
    tmp, final = Path(self.get()), Path(self.get_final())
    await asyncio.to_thread(lambda: fsync(*sorted(tmp.rglob("*"), reverse=True), tmp))
    await super().finalize(*args, **kwargs)
    await asyncio.to_thread(
        lambda: fsync(*(p for p in final.iterdir() if p.is_file()), final, final.parent))


def _orbax_release() -> tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r"\d+",
                                                importlib.metadata.version("orbax-checkpoint"))[:2])


# Orbax 0.11 (the Metal stack's pin) finalises each item's temporary directory while
# tensorstore still commits into it, so the fsyncs' rename wraps Orbax 0.12 and newer only
# (the Metal pins' tests failed every save with it: .ci/run).
DURABLE_RENAME = _orbax_release() >= (0, 12)


def _manager(directory: Path, durable: bool = True) -> ocp.CheckpointManager:
  # Latest and best may save the same step at once: their cross-process barriers need
  # distinct names. Old steps are deleted by Checkpoints, not Orbax: Orbax deletes them
  # even when the new save fails (seen with a full disk).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None, cleanup_tmp_directories=True,
      temporary_path_class=_Durable if durable and DURABLE_RENAME else None,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=directory.name))
  return ocp.CheckpointManager(directory.absolute(), options=options,
                               item_names=("state", "meta"))


def _restore(path: Path, **items):
  """Restores the named items of the checkpoint at `path`; any failure means it is broken.

  When a read fails, Orbax closes its event loop while other reads are still running; they
  report to the closed loop with tracebacks, during the restore and for a moment after it.
  What the restore writes to stderr is held back, and shown only if it succeeds.
  """
  held = io.StringIO()
  try:
    with contextlib.redirect_stderr(held):
      restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
          path.absolute(), args=ocp.args.Composite(**items))
  except Exception as e:  # Orbax and tensorstore raise many kinds; all mean the same here.
    with contextlib.redirect_stderr(io.StringIO()):
      time.sleep(0.5)
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise corrupt(path, reason) from None
  sys.stderr.write(held.getvalue())
  return restored


def corrupt(path: Path, reason: str) -> UserError:
  """The refusal of the broken checkpoint at `path`, naming the other one if there is one."""
  others = [p for p in Checkpoints(path.parent.parent.parent).existing().values() if p != path]
  hint = (f" The checkpoint {others[0]} may be used instead: --resume_from={others[0]}"
          if others else "")
  return UserError(f"Checkpoint {path} is corrupt or incomplete ({reason}).{hint}")


def _failure(error: Exception | None) -> tuple[str, int | None]:
  """The OS error behind a failed write (tensorstore names its errno) and its code, else the
  first line."""
  if error is None:
    return "the write did not complete", None
  if isinstance(error, OSError) and error.errno:
    return os.strerror(error.errno), error.errno
  if (code := re.search(r"os_error_code\W*(\d+)", str(error))):
    return os.strerror(int(code.group(1))), int(code.group(1))
  text = str(error).strip()
  return (text.splitlines()[0][:200] if text else type(error).__name__), None


class SaveFailed(UserError):
  """A checkpoint save failed; `kind` and `step` say which, `retried` whether it was the
  second try."""

  def __init__(self, message: str, kind: str, step: int, reason: str, retried: bool):
    super().__init__(message)
    self.kind, self.step, self.reason, self.retried = kind, step, reason, retried


def _steps(directory: Path) -> list[int]:
  """Finished checkpoint steps in one manager directory (temporary ones excluded)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class Checkpoints:
  """The latest and best checkpoints of one workdir. `durable` (the default) syncs each
  save to disk before it counts (_Durable); the benchmark turns it off to time it."""

  def __init__(self, workdir: Path, durable: bool = True):
    self.root = Path(workdir) / "checkpoints"
    self.durable = durable
    self._managers = {}  # Made on first save: looking never creates directories.
    self._saving = {}  # kind: the step of its last save, until it is known to be on disk.

  def path(self, kind: str) -> Path | None:
    steps = _steps(self.root / kind)
    return self.root / kind / str(steps[-1]) if steps else None

  def existing(self) -> dict[str, Path]:
    return {kind: path for kind in KINDS if (path := self.path(kind))}

  def newest(self) -> Path | None:
    """The complete checkpoint of the highest iteration (latest on a tie)."""
    return max(self.existing().values(), key=lambda p: int(p.name), default=None)

  def save(self, kind: str, step: int, state, meta: dict, retried: bool = False) -> float:
    """Starts an async save; returns the seconds it blocked the caller. A failed save
    (this one, or the one of this kind before it) raises SaveFailed."""
    start = time.perf_counter()
    try:
      if kind not in self._managers:
        self._managers[kind] = _manager(self.root / kind, self.durable)
      # Orbax first waits for this kind's previous save: its failure shows here.
      meta = meta | {"checksums": checksums.tree_checksums(state)}  # Before donation.
      self._managers[kind].save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # Orbax and tensorstore raise many kinds; all mean the same here.
      self._check_saved(kind, e, retried)  # The previous save's failure, if it was that.
      self._saving[kind] = step
      self._check_saved(kind, e, retried)  # This one's.
      raise
    self._check_saved(kind)
    self._saving[kind] = step
    return time.perf_counter() - start

  def _check_saved(self, kind: str, error: Exception | None = None,
                   retried: bool = False) -> None:
    """After `kind`'s last save has ended: keeps its newest finished step alone, or, when
    that save failed, removes what it left and keeps the previous one, raising SaveFailed.
    Process 0 alone: it finishes saves (the others may look before it has)."""
    if jax.process_index() != 0:
      return
    finished = self.path(kind)
    if kind in self._saving and (finished is None or int(finished.name) != self._saving[kind]):
      step = self._saving.pop(kind)
      for tmp in (self.root / kind).glob("*.orbax-checkpoint-tmp*"):  # Its space, for a retry.
        shutil.rmtree(tmp, ignore_errors=True)
      reason, code = _failure(error)
      kept = f"The previous checkpoint {finished} is kept" if finished else "Nothing was saved"
      raise SaveFailed(f"Could not save the {kind} checkpoint at iteration {step} ({reason})"
                       f"{', on a second try too' if retried else ''}. {kept}; "
                       f"{write_advice(code)}, then resume with --resume.", kind, step, reason,
                       retried)
    self._saving.pop(kind, None)
    for old in _steps(self.root / kind)[:-1]:
      shutil.rmtree(self.root / kind / str(old))

  def poll(self) -> None:
    """Checks, without waiting, the saves that ended since the last look: a failed one
    raises SaveFailed at once rather than at the next save."""
    for kind in list(self._saving):
      manager = self._managers[kind]
      if not manager.is_saving_in_progress():
        self._finished(kind, manager)

  def _finished(self, kind: str, manager, retried: bool = False) -> None:
    try:
      manager.wait_until_finished()
      manager.check_for_errors()
    except Exception as e:  # As in save().
      self._check_saved(kind, e, retried)
      raise
    self._check_saved(kind, retried=retried)

  def wait(self, retried: bool = False) -> None:
    for kind, manager in self._managers.items():
      self._finished(kind, manager, retried)

  def close(self) -> None:
    """Ends the managers; a failed save is for wait() to report."""
    for manager in self._managers.values():
      with contextlib.suppress(Exception):
        manager.close()
    self._managers.clear()


def resolve(spec: str, workdir: Path) -> Path:
  """The step directory `spec` names: `latest` / `best` (in `workdir`), a step directory,
  a latest/ or best/ directory, a checkpoints/ directory, or a workdir."""
  if spec in KINDS:
    path = Checkpoints(workdir).path(spec)
    if path is None:
      raise UserError(f"{workdir} has no {spec} checkpoint.")
    return path
  path = Path(spec).expanduser()
  if not path.exists():
    raise UserError(f"Checkpoint {path} does not exist.")
  for candidate in (path, path / "latest", path / "checkpoints" / "latest"):
    if candidate.name.isdigit() and (candidate / "meta").is_dir():
      return candidate
    if (steps := _steps(candidate)):
      return candidate / str(steps[-1])
  raise UserError(f"{path} is not a randygpt checkpoint (expected a step directory such as "
                  "runs/NAME/checkpoints/latest/1000, or a workdir that holds one).")


def make_meta(step: int, best: tuple[float, int] | None, tokenizer, config, **extra) -> dict:
  """A checkpoint's metadata: the format, the iteration, the best evaluation so far, the
  vocabulary and the run's flags (with `extra` entries, e.g. where an import came from)."""
  best_val, best_iter = best or (None, None)
  # A BPE tokenizer is kept whole, for sampling without the text; characters are "vocab".
  kept = {"tokenizer": record} if (record := tokenizer.record()) else {}
  return {"format": FORMAT, "iter": step, "best_val_loss": best_val, "best_iter": best_iter,
          "vocab": list(tokenizer.chars), **kept, "config": config.recorded_flags(), **extra}


def saved_tokenizer(meta: dict):
  """The tokenizer a checkpoint's metadata keeps: its BPE tokenizer (ours or randyGPT's),
  else its characters."""
  if (record := meta.get("tokenizer")) and record.get("kind") == "bpe":
    return data.BpeTokenizer.from_json(record["model"])
  if record and record.get("kind") == "randygpt-bpe":
    return data.RandygptBpeTokenizer.from_record(record)
  return data.CharTokenizer(tuple(meta["vocab"]))


def check_vocab(saved_chars, tokenizer, path: Path, data_path: str) -> None:
  """Refuses to resume a checkpoint on text with another vocabulary."""
  if tuple(saved_chars) == tokenizer.chars:
    return
  if len(saved_chars) != tokenizer.vocab_size:
    detail = f"Checkpoint vocab_size {len(saved_chars)} != data vocab_size {tokenizer.vocab_size}"
  else:
    detail = "Checkpoint vocabulary differs from the data's (same size, other characters)"
  raise UserError(f"{detail}: {path} was trained on other text than --data={data_path}. "
                  "Resume with the text it was trained on, or start a new run in another "
                  "--workdir.")


def read_meta(path: Path) -> dict:
  meta = _restore(path, meta=ocp.args.JsonRestore())["meta"]
  found = meta.get("format") if isinstance(meta, dict) else None
  if isinstance(found, str) and found.startswith(FORMAT_NAME + "-") and found not in READS:
    readable = " and ".join(map(repr, READS))
    raise UserError(f"{path} is a {found!r} checkpoint, which this randygpt cannot read (it "
                    f"reads {readable}): train a new run, or use the randygpt that wrote it.")
  if found not in READS:
    raise UserError(f"{path} is not a randygpt checkpoint (its metadata has no {FORMAT!r}).")
  return meta


def restore_train_state(path: Path, model_config, tc, sharding: jax.sharding.Sharding) -> dict:
  """The train state saved at `path`, for the run's model and optimizer, placed with
  `sharding`."""
  init = train.state_initializer(model_config, tc)
  restored = restore_state(path, abstract_like(jax.eval_shape(init, jax.random.key(0)),
                                               sharding))
  # jaxlib 0.5 (the Metal stack) can hand back arrays that share host memory with NumPy;
  # donating those to the train step corrupts the heap, so the step gets its own copies.
  return jax.tree.map(jnp.copy, restored)


def restore_state(path: Path, abstract_state):
  """The train state at `path`, shaped and placed like `abstract_state` (ShapeDtypeStructs),
  checked against the checksums saved with it (format 3 on)."""
  restored = _restore(path, state=ocp.args.StandardRestore(abstract_state),
                      meta=ocp.args.JsonRestore())
  meta = restored["meta"]
  if isinstance(meta, dict) and meta.get("format", FORMAT) != READS[0]:
    if (bad := checksums.mismatched(restored["state"], meta.get("checksums") or {})):
      more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
      raise corrupt(path, f"{bad[0]}{more} differ from the checksums saved with them")
  return restored["state"]


def abstract_like(state_shapes, sharding: jax.sharding.Sharding):
  """ShapeDtypeStructs placed with `sharding`, the restore target Orbax asks for."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state_shapes)


def plan_start(workdir: Path, resume: bool, resume_from: str, overwrite: bool):
  """Which checkpoint a run starts from (None: fresh) and which existing ones it discards.

  Refuses, rather than silently destroying checkpoints: a fresh start in a workdir that
  has them, or resuming from an older one while newer ones exist, needs --overwrite.
  """
  checkpoints = Checkpoints(workdir)
  existing = checkpoints.existing()
  source = None
  if resume_from:
    source = resolve(resume_from, workdir)
  elif resume:  # The newest complete state: best is newer when its save came after latest's.
    source = checkpoints.newest()
    if source is None:
      print(f"No checkpoint in {workdir}: starting fresh.", flush=True)
    elif "latest" in existing and source != existing["latest"]:
      print(f"The best checkpoint ({source}) is newer than the latest: resuming from it.",
            flush=True)
  inside = source is not None and checkpoints.root.resolve() in source.resolve().parents
  if inside:
    newer = [p for p in existing.values() if int(p.name) > int(source.name)]
    if newer and not overwrite:
      raise UserError(
          f"Resuming {workdir} from iteration {source.name} would discard its newer "
          f"checkpoint {newer[0]}. Pass --overwrite to discard it, or continue in a new "
          f"--workdir (a fork keeps both).")
    return source, newer
  if existing and not overwrite:
    latest = existing.get("latest") or existing.get("best")
    raise UserError(
        f"{workdir} already holds checkpoints (latest: iteration {latest.name}). Use --resume "
        "to continue from it, --overwrite to start over (deleting them), or another --workdir.")
  return source, list(existing.values())
