"""An accelerator that fails, without one: the second CPU device stands in for it (a `place`
that chooses it), and an executor around each piece of work sent to it raises (or returns a
wrong number), both passed to the run as arguments. The CPU, device 0, takes over; the runs
must end as an all-CPU run does."""

import dataclasses
import json

import jax
import pytest

from randygpt import trainer
from randygpt.config import ModelConfig, SampleConfig, TrainConfig
from randygpt.runtime import fallback, platforms

from conftest import (make_corpus, raises_user_error, read_metrics, run_config, run_training,
                      sample_in_process, tiny, write_corpus)

# Shares the all-CPU reference run (a module fixture) on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("fallback_reference")

# Evaluated at 2 and 4; two prompts, so that sampling can fail between them. "auto": the
# stand-in is the chosen accelerator, and its header lines are auto's.
RUN = tiny(iters=4, eval_interval=2, log_interval=2, checkpoint_interval=2,
           prompt=("ANNA:", "né"), max_new_tokens=8, eval_platform="auto")
ERROR = "UNIMPLEMENTED: a stand-in for an operation the plugin lacks"
SAME = ("iter", "train_loss", "eval_train_loss", "val_loss", "lr")


class Hook:
  """An executor that records what it runs; the `n`-th piece of work of kind `kind` raises
  `error` instead (after running when `after`), or, with `add`, returns its result plus
  `add`."""

  def __init__(self, kind: str = "", n: int = 1, error: Exception | None = None,
               add: float = 0.0, after: bool = False):
    self.kind, self.n, self.add, self.after = kind, n, add, after
    self.error = error or RuntimeError(f"{ERROR}\nand a second line")
    self.calls = []

  def __call__(self, what, work):
    self.calls.append(what)
    if what != self.kind or self.calls.count(what) != self.n:
      return work()
    if self.add:
      return work() + self.add
    if self.after:
      work()
    raise self.error


def stand_in(train_on_accelerator: bool = False):
  """A `place` whose evaluation device is the second CPU device, chosen as an accelerator is
  (and whose training devices count as an accelerator when `train_on_accelerator`)."""
  def place(train_platform, eval_platform, num_cpu_devices=0):
    device = jax.devices("cpu")[1]
    return dataclasses.replace(
        platforms.place(train_platform, eval_platform, num_cpu_devices), eval_device=device,
        eval_notes=(platforms.enabled(device, "evaluation"),),
        train_on_accelerator=train_on_accelerator)
  return place


def run_on_stand_in(workdir, hook: Hook, train_on_accelerator: bool = False, **values):
  """run_training with evaluation on the stand-in, `hook` its executor."""
  return trainer.run(run_config(workdir=workdir, **values), stand_in(train_on_accelerator),
                     hook)


def sample_on_stand_in(hook: Hook, *args: str) -> None:
  sample_in_process(*args, place=stand_in(), executor=hook)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")


@pytest.fixture(scope="module")
def reference(corpus):
  """The all-CPU run's workdir."""
  workdir = corpus.parent / "cpu"
  assert run_training(workdir, **RUN | {"data": corpus, "eval_platform": "cpu"})[
      "status"] == "completed"
  return workdir


def checkpoints(workdir):
  return sorted(str(p.relative_to(workdir)) for p in (workdir / "checkpoints").glob("*/*"))


def assert_like_the_cpu_run(workdir, reference, summary, stdout, stderr):
  assert summary["status"] == "completed"
  assert ([{k: r.get(k) for k in SAME} for r in read_metrics(workdir)]
          == [{k: r.get(k) for k in SAME} for r in read_metrics(reference)])
  assert (workdir / "samples.txt").read_text() == (reference / "samples.txt").read_text()
  assert summary["final_val_full"] == json.loads(
      (reference / "summary.json").read_text())["final_val_full"]
  assert checkpoints(workdir) == checkpoints(reference) == [
      "checkpoints/best/4", "checkpoints/latest/4"]
  assert "Traceback" not in stdout + stderr
  warnings = [line for line in stdout.splitlines() if line.startswith("⚠")]
  assert len(warnings) == 1, stdout
  recorded = json.loads((workdir / "run.json").read_text())["starts"][-1]["eval_fallback"]
  assert summary["eval_fallback"] == recorded
  assert json.loads((workdir / "summary.json").read_text()) == summary
  return warnings[0], recorded


@pytest.mark.parametrize("kind, n, during, at_iter, calls", [
    ("estimate", 1, "evaluation", 2, ["estimate"]),
    ("estimate", 2, "evaluation", 4, ["estimate", "estimate"]),
    ("estimate", 3, "evaluation", 4, ["estimate", "estimate", "estimate"]),
    ("sample", 2, "sampling", 4, ["estimate", "estimate", "estimate", "sample", "sample"]),
], ids=["first-evaluation", "second-evaluation", "final-evaluation-of-the-whole-split",
        "second-prompt-of-the-samples"])
def test_a_failure_after_start_up_falls_back_once(reference, corpus, tmp_path, capsys, kind, n,
                                                  during, at_iter, calls):
  hook = Hook(kind, n)
  summary = run_on_stand_in(tmp_path / "w", hook, **RUN | {"data": corpus})
  out, err = capsys.readouterr()
  assert "✓ CPU enabled for evaluation: cpu:1" in out  # The stand-in was chosen.
  warning, recorded = assert_like_the_cpu_run(tmp_path / "w", reference, summary, out, err)
  assert warning == (f"⚠ CPU (cpu:1) failed during {during} ({ERROR}); evaluating and "
                     "sampling on CPU from here on.")
  assert recorded == {"at_iter": at_iter, "backend": "cpu:1", "error": ERROR,
                      "during": during}
  # Nothing went to the failed device after its failure.
  assert hook.calls == ["probe-estimate", "probe-sample", *calls]


@pytest.mark.parametrize("hook, problem", [
    (Hook("probe-estimate"), ERROR),
    (Hook("probe-sample"), ERROR),
    (Hook("probe-estimate", add=0.5), "its loss estimate "),
], ids=["estimate-fails", "sampler-fails", "wrong-estimate"])
def test_a_probe_that_fails_evaluates_on_the_cpu_from_the_start(reference, corpus, tmp_path,
                                                                 capsys, hook, problem):
  summary = run_on_stand_in(tmp_path / "w", hook, **RUN | {"data": corpus})
  out, err = capsys.readouterr()
  warning, recorded = assert_like_the_cpu_run(tmp_path / "w", reference, summary, out, err)
  assert warning.startswith(f"⚠ CPU backend `cpu` failed ({problem}")
  assert warning.endswith("); evaluating on CPU")  # platforms._choose's line.
  assert "✓" not in out  # It replaced the line that chose the stand-in.
  assert recorded["during"] == "start-up probe" and recorded["at_iter"] == 0
  # The accelerator did nothing after its probe.
  assert hook.calls[-1] == hook.kind and all(c.startswith("probe-") for c in hook.calls)


def test_the_probe_s_estimate_is_the_cpu_s(reference, corpus, tmp_path, capsys):
  """Unharmed, the stand-in passes its probe and evaluates everything."""
  hook = Hook()
  summary = run_on_stand_in(tmp_path / "w", hook, **RUN | {"data": corpus, "iters": 2})
  assert summary["eval_fallback"] is None
  assert hook.calls == ["probe-estimate", "probe-sample", "estimate", "estimate", "sample",
                        "sample"]  # The estimate at 2, the final evaluation, the samples.
  assert "⚠" not in capsys.readouterr().out
  got, want = read_metrics(tmp_path / "w")[0], read_metrics(reference)[0]
  assert got["iter"] == 2 and {k: got[k] for k in SAME} == {k: want[k] for k in SAME}


def test_a_bfloat16_run_s_probe_compares_with_the_cpu_s_float32_estimate(corpus, tmp_path,
                                                                          capsys, monkeypatch):
  """A GPU run's compute (bfloat16; XLA's attention, as cuDNN's runs off the GPU) passes the
  probe on the stand-in, checked against the exact function on the CPU: float32, einsum
  (cuDNN's attention would not compile there), within bfloat16's tolerance."""
  from randygpt import evaluate
  from randygpt.runtime import fallback
  compiled, jit_eval_loss = [], evaluate.jit_eval_loss
  monkeypatch.setattr(evaluate, "jit_eval_loss", lambda config, *args: (
      compiled.append((config.compute_dtype, config.attention)), jit_eval_loss(config, *args))[1])
  hook = Hook()
  summary = run_on_stand_in(tmp_path / "w", hook, **RUN | {
      "data": corpus, "iters": 2, "compute_dtype": "bfloat16", "attention": "xla"})
  assert summary["eval_fallback"] is None and "⚠" not in capsys.readouterr().out
  assert hook.calls[:2] == ["probe-estimate", "probe-sample"]
  assert {("bfloat16", "xla"), ("float32", "einsum")} <= set(compiled)
  assert fallback.PROBE_RTOL["bfloat16"] > fallback.PROBE_RTOL["float32"]


def test_sampling_from_a_checkpoint_falls_back_too(trained, capsys):
  hook = Hook("sample", 2)
  sample_on_stand_in(hook, "--workdir=w", "--checkpoint=latest", "--prompt=ANNA:", "--prompt=né",
                    "--max_new_tokens=30", "--eval_platform=auto")
  out = capsys.readouterr().out
  assert [line for line in out.splitlines() if line.startswith("⚠")] == [
      f"⚠ CPU (cpu:1) failed during sampling ({ERROR}); evaluating and sampling on CPU "
      "from here on."]
  printed = "\n".join(line for line in out.split("\n") if not line.startswith("⚠"))
  runs = (trained / "samples.txt").read_text(encoding="utf-8").split("\n\n")[:2]
  assert printed.split("Generating samples...\n")[1] == "".join(f"\n{s}\n\n" for s in runs)
  assert hook.calls == ["probe-sample", "sample", "sample"]


def test_sampling_from_a_checkpoint_after_a_failed_probe(trained, capsys):
  hook = Hook("probe-sample")
  sample_on_stand_in(hook, "--workdir=w", "--checkpoint=latest", "--prompt=ANNA:",
                    "--max_new_tokens=30", "--eval_platform=auto")
  out = capsys.readouterr().out
  assert [line for line in out.splitlines() if line.startswith("⚠")] == [
      f"⚠ CPU backend `cpu` failed ({ERROR}); evaluating on CPU"]
  first = (trained / "samples.txt").read_text(encoding="utf-8").split("\n\n")[0]
  assert f"\n{first}\n" in out and hook.calls == ["probe-sample"]


# The Evaluator alone, on a tiny model.

CONFIG = ModelConfig(vocab_size=0, n_embd=16, n_head=2, n_layer=1, block_size=16)


@pytest.fixture(scope="module")
def parts():
  from randygpt import data, model
  text = make_corpus()
  tokenizer = data.CharTokenizer.from_text(text)
  config = ModelConfig(**{**vars(CONFIG), "vocab_size": tokenizer.vocab_size})
  tokens = tokenizer.encode(text)
  params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), config)
  return config, {"train": tokens[:5000], "val": tokens[5000:]}, params


def evaluator(parts, device, eval_iters=8, executor=fallback.run_plainly):
  config, splits, _ = parts
  return fallback.GuardedEvaluator(device, config, SampleConfig(), splits, jax.random.key(1),
                                   TrainConfig(batch_size=4, eval_iters=eval_iters), executor)


def out_of_memory_while(condition):
  error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                     "allocate 1.00GiB.")

  def hook(what, work):
    if condition():
      raise error
    return work()
  return hook


def test_out_of_memory_retries_in_smaller_chunks_first(parts, capsys):
  cpu = evaluator(parts, jax.devices("cpu")[0])(parts[2])
  chunks = []
  stand_in = evaluator(parts, jax.devices("cpu")[1], executor=out_of_memory_while(
      lambda: chunks.append(stand_in.evaluator.chunks) or stand_in.evaluator.chunks < 4))
  assert stand_in.evaluator.chunks == 1  # One chunk of 8 batches of 64 tokens on the CPU.
  assert stand_in(parts[2]) == pytest.approx(cpu, rel=1e-5)  # Chunks sum in another order.
  assert chunks == [1, 2, 4] and stand_in.on_accelerator and stand_in.fallback is None
  assert "⚠" not in capsys.readouterr().out


def test_out_of_memory_in_one_window_chunks_falls_back(parts, capsys):
  cpu = evaluator(parts, jax.devices("cpu")[0], eval_iters=6)(parts[2])
  chunks = []
  stand_in = evaluator(parts, jax.devices("cpu")[1], eval_iters=6, executor=out_of_memory_while(
      lambda: chunks.append(stand_in.evaluator.chunks) or True))
  assert stand_in(parts[2]) == cpu
  assert chunks == [1, 2, 4, 8, 24]  # Chunks of 24 windows halved (to a divisor), down to 1.
  assert not stand_in.on_accelerator and stand_in.fallback["during"] == "evaluation"
  assert capsys.readouterr().out.startswith("⚠ CPU (cpu:1) failed during evaluation "
                                            "(RESOURCE_EXHAUSTED: Out of memory")


def test_a_failure_on_the_cpu_too_raises_the_accelerator_s_error(parts):
  """The fallback hides no bug: broken parameters fail on both devices."""
  stand_in = evaluator(parts, jax.devices("cpu")[1], executor=Hook("estimate"))
  broken = {k: v for k, v in parts[2].items() if k != "wte"}
  with pytest.raises(RuntimeError, match=ERROR) as info:
    stand_in(broken)
  assert isinstance(info.value.__context__, KeyError)  # The CPU's own failure.


# A training accelerator that fails.

TRAIN = RUN | {"eval_platform": "cpu", "checkpoint_interval": 100, "iters": 4}
MESSAGE = (f"Training on CPU (cpu:0) failed at iteration 4 or before ({ERROR}). {{kept}} "
           "Continue on the CPU: python -m randygpt.main --resume --train_platform=cpu "
           "--workdir=w")


@pytest.mark.parametrize("after, kept", [
    (False, "Its state at iteration 3 is saved: w/checkpoints/latest/3."),
    # The failed step consumed the state (donated): the best checkpoint, at 2, is the last.
    (True, "Its last checkpoint is kept: w/checkpoints/best/2."),
], ids=["state-intact", "state-consumed"])
def test_a_training_device_that_fails_saves_what_it_can(reference, corpus, tmp_path,
                                                        monkeypatch, capsys, after, kept):
  monkeypatch.chdir(tmp_path)
  hook = Hook("train-step", 4, jax.errors.JaxRuntimeError(ERROR), after=after)
  with raises_user_error(MESSAGE.format(kept=kept)):
    run_on_stand_in("w", hook, train_on_accelerator=True, **TRAIN | {"data": corpus})
  summary = json.loads((tmp_path / "w" / "summary.json").read_text())
  assert summary["status"] == "failed" and summary["best_iter"] == 2
  if after:
    return
  # It continues on the CPU as if nothing had happened.
  assert run_training("w", resume=True, train_platform="cpu")["status"] == "completed"
  got, want = read_metrics(tmp_path / "w")[-1], read_metrics(reference)[-1]
  assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}
  assert (tmp_path / "w" / "samples.txt").read_text() == (reference / "samples.txt").read_text()
