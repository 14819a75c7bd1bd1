"""`python -m randygpt.import_bin`: randyGPT's RGPT0001 checkpoints, written here from the
format description, imported (in this process) and checked against a NumPy reference of
randyGPT's model."""

import json

import jax
import numpy as np
import pytest

from randygpt import data, import_bin, model, optim
from randygpt.config import ModelConfig, TrainConfig

from conftest import (assert_clean_error, make_corpus, parsed_flags, raises_user_error,
                      run_training, sample_in_process)

SHAPE = {"n_embd": 32, "n_head": 4, "n_layer": 2, "block_size": 16}
SHAPE_FLAGS = [f"--{k}={v}" for k, v in SHAPE.items()]
TRAIN_FLAGS = ["--batch_size=4", "--eval_iters=2", "--eval_interval=5", "--log_interval=1"]
# '<' and '>' in the text, and CRLF lines, as randyGPT users' files may have them.
TEXT = make_corpus(3000) + "\r\n<b>bold</b> a > b\r\n"
ITER, STEP = 11, 7  # A step count unlike the iteration: the mapping of each is checked.


def randygpt_vocab(text: str) -> list[str]:
  """randyGPT's vocabulary of TEXT-like text (CR only before LF): BOS, EOS, the characters."""
  return ["<", ">", *sorted(set(text.replace("\r", "")) | {"\n"})]


def rgpt_weights(rng, vocab_size, n_embd, n_layer, block_size, **_) -> dict:
  """Random weights by name in RGPT0001 file order, each [n_out, n_in]; scaled to keep
  activations near 1, so that every weight matters to the logits."""
  e = n_embd
  shapes = {"wte": (vocab_size, e), "wpe": (block_size, e), "lm_head": (vocab_size, e)}
  for i in range(n_layer):
    shapes |= {f"{i}.wq": (e, e), f"{i}.wk": (e, e), f"{i}.wv": (e, e), f"{i}.wo": (e, e),
               f"{i}.fc1": (4 * e, e), f"{i}.fc2": (e, 4 * e)}
  return {name: rng.normal(0.0, shape[1] ** -0.5, shape).astype(np.float32)
          for name, shape in shapes.items()}


def write_rgpt(path, weights, m, v, *, vocab_size, iter_=ITER, step=STEP, best_loss=1.25):
  with open(path, "wb") as f:
    f.write(b"RGPT0001")
    np.array([vocab_size, iter_, step], "<u4").tofile(f)
    np.array([best_loss], "<f4").tofile(f)
    for w in weights.values():
      w.astype("<f4").tofile(f)
    for name in weights:
      m[name].astype("<f4").tofile(f)
      v[name].astype("<f4").tofile(f)
  return path


def rmsnorm(x_TxE):
  return x_TxE / np.sqrt(np.mean(x_TxE**2, axis=-1, keepdims=True) + 1e-5)


def reference_logits(w, tokens, n_layer, n_head) -> np.ndarray:
  """randyGPT's forward pass in float64: W·x projections, per-head causal attention,
  squared-ReLU MLP, gain-free pre-norm, no final norm."""
  w = {k: a.astype(np.float64) for k, a in w.items()}
  t = len(tokens)
  x_TxE = w["wte"][tokens] + w["wpe"][:t]
  k = x_TxE.shape[1] // n_head
  causal_TxT = np.tril(np.ones((t, t), bool))
  for i in range(n_layer):
    xn_TxE = rmsnorm(x_TxE)
    q, key, val = (xn_TxE @ w[f"{i}.{name}"].T for name in ("wq", "wk", "wv"))
    out_TxE = np.zeros_like(x_TxE)
    for h in range(n_head):
      cols = slice(h * k, (h + 1) * k)
      scores_TxT = np.where(causal_TxT, q[:, cols] @ key[:, cols].T / np.sqrt(k), -np.inf)
      probs_TxT = np.exp(scores_TxT - scores_TxT.max(axis=1, keepdims=True))
      out_TxE[:, cols] = (probs_TxT / probs_TxT.sum(axis=1, keepdims=True)) @ val[:, cols]
    x_TxE = x_TxE + out_TxE @ w[f"{i}.wo"].T
    hidden = np.maximum(rmsnorm(x_TxE) @ w[f"{i}.fc1"].T, 0.0) ** 2
    x_TxE = x_TxE + hidden @ w[f"{i}.fc2"].T
  return x_TxE @ w["lm_head"].T


@pytest.fixture
def checkpoint_file(tmp_path):
  """An RGPT0001 file of SHAPE for TEXT, with TEXT in c.txt; returns (path, weights, m, v)."""
  (tmp_path / "c.txt").write_bytes(TEXT.encode("utf-8"))
  vocab_size = len(randygpt_vocab(TEXT))
  rng = np.random.default_rng(0)
  weights = rgpt_weights(rng, vocab_size, **SHAPE)
  m = {k: 0.01 * rng.standard_normal(a.shape).astype(np.float32) for k, a in weights.items()}
  v = {k: 1e-4 * rng.random(a.shape).astype(np.float32) for k, a in weights.items()}
  path = write_rgpt(tmp_path / "checkpoint.bin", weights, m, v, vocab_size=vocab_size)
  return path, weights, m, v


def imported(path):
  """The file's weights and moments as randygpt trees, with the header and model config."""
  header = import_bin.read_header(path)
  config = ModelConfig(vocab_size=int(header["vocab_size"]), **SHAPE)
  import_bin.check_size(path, config)
  return (*import_bin.read_tensors(path, config), header, config)


@pytest.mark.parametrize("length", [SHAPE["block_size"], 5])
def test_forward_matches_numpy_reference_of_randygpt(checkpoint_file, length):
  path, weights, _, _ = checkpoint_file
  params, _, _, header, config = imported(path)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, length)
  logits = model.forward(jax.tree.map(np.asarray, params), tokens[None], config)[0]
  expected = reference_logits(weights, tokens, SHAPE["n_layer"], SHAPE["n_head"])
  assert np.abs(expected).max() > 1.0  # Logits large enough that a wrong mapping shows.
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4,
                             atol=1e-5 * np.abs(expected).max())


def test_moments_are_mapped_like_the_weights(tmp_path):
  rng = np.random.default_rng(2)
  weights = rgpt_weights(rng, 9, **SHAPE)
  path = write_rgpt(tmp_path / "x.bin", weights, {k: 2 * a for k, a in weights.items()},
                    {k: a * a for k, a in weights.items()}, vocab_size=9)
  params, mu, nu, _, _ = imported(path)
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(m, 2 * p), params, mu)
  jax.tree.map(lambda p, n: np.testing.assert_array_equal(n, p * p), params, nu)


def test_next_adam_update_is_randygpts_next_update(checkpoint_file):
  """With randyGPT's betas and no decay or clipping, the imported state's next update is
  randyGPT's adam_step at t = step + 1, at the schedule's rate for iteration ITER + 2."""
  params, mu, nu, header, _ = imported(checkpoint_file[0])
  tc = TrainConfig(beta1=0.9, beta2=0.999, weight_decay=0.0, grad_clip=1e9,
                   learning_rate=1e-3, warmup_iters=5, lr_decay_iters=100)
  optimizer = optim.make_optimizer(tc)
  iteration = int(header["iter"]) + 1
  state = import_bin.train_state(params, mu, nu, step=int(header["step"]),
                                 iteration=iteration, optimizer=optimizer)
  grads = jax.tree.map(lambda p: np.random.default_rng(p.size).standard_normal(p.shape)
                       .astype(np.float32), params)
  updates, _ = jax.jit(optimizer.update)(grads, state["opt"], state["params"])
  t, lr = STEP + 1, float(optim.lr_schedule(tc)(ITER + 1))

  def randygpt_update(g, m, v):
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    return -lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
  jax.tree.map(lambda u, g, m, v: np.testing.assert_allclose(
      u, randygpt_update(g, m, v), rtol=2e-5, atol=1e-9), updates, grads, mu, nu)


def test_randygpt_tokenizer_keeps_its_slots_and_reads_lines(tmp_path):
  def load(text, tokenizer):
    (tmp_path / "t.txt").write_bytes(text.encode())
    corpus = data.load_corpus(str(tmp_path / "t.txt"), tmp_path / "cache", tokenizer=tokenizer)
    return corpus.tokenizer.decode(np.asarray(corpus.tokens)), corpus.tokenizer
  text, tok = load("a<b\r\nc>", "randygpt")
  assert text == "a<b\nc>\n"
  assert tok.chars == ("<", ">", "\n", "<", ">", "a", "b", "c")
  assert tok.encode("<>a").tolist() == [3, 4, 5]  # The text's own ids, never BOS/EOS.
  assert tok.decode([0, 1, 3]) == "<><"
  assert load("x\n\ny\n", "randygpt")[0] == "x\n\ny\n"
  assert load("a<b\r\n", "chars") == ("a<b\r\n", data.CharTokenizer(("\n", "\r", "<", "a", "b")))


def n_params(vocab_size, n_embd, n_layer, block_size):
  return model.n_params(ModelConfig(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer,
                                    block_size=block_size))


def test_shapes_that_fit_find_the_shape_closest_to_the_flags():
  count = n_params(40, 64, 3, 32)
  fits = import_bin.shapes_that_fit(count, 40, ModelConfig(n_embd=64, n_layer=4, block_size=32))
  assert fits[0] == (64, 3, 32)
  assert all(n_params(40, *s) == count for s in fits)


def import_checkpoint(*args):
  """`python -m randygpt.import_bin args...` in this process."""
  with parsed_flags(*[a for a in args if a.startswith("--")]):
    import_bin.import_bin([a for a in args if not a.startswith("--")])


# With --ema_decay the imported run keeps an average too, starting at the imported weights:
# its samples are theirs.
@pytest.mark.parametrize("average", [[], ["--ema_decay=0.9"]], ids=["weights", "ema"])
def test_import_then_sample(checkpoint_file, tmp_path, monkeypatch, capsys, average):
  path, weights, _, _ = checkpoint_file
  monkeypatch.chdir(tmp_path)
  import_checkpoint(path.name, "--data=c.txt", "--workdir=w", *SHAPE_FLAGS, *TRAIN_FLAGS,
                    *average)
  assert f"Saved latest checkpoint: w/checkpoints/latest/{ITER + 1}" in capsys.readouterr().out
  workdir = tmp_path / "w"
  assert json.loads((workdir / "vocab.json").read_text("utf-8"))["chars"] == randygpt_vocab(TEXT)
  assert {"--tokenizer=randygpt", "--beta2=0.999", f"--iters={ITER + 1}"} <= set(
      (workdir / "flags.cfg").read_text().splitlines())

  # Greedy sampling continues the prompt as randyGPT's own forward pass would.
  vocab = randygpt_vocab(TEXT)
  tokens = [vocab.index(c) for c in "ANNA"]  # Each of these characters appears once.
  for _ in range(8):
    logits = reference_logits(weights, np.array(tokens), SHAPE["n_layer"], SHAPE["n_head"])
    tokens.append(int(np.argmax(logits[-1])))
  sample_in_process("--workdir=w", "--prompt=ANNA", "--max_new_tokens=8", "--temperature=0")
  stdout = capsys.readouterr().out
  assert f"iteration {ITER + 1};" in stdout
  assert "\n" + "".join(vocab[i] for i in tokens) + "\n" in stdout


@pytest.mark.slow
def test_import_then_resume(checkpoint_file, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  import_checkpoint(checkpoint_file[0].name, "--data=c.txt", "--workdir=w", *SHAPE_FLAGS,
                    *TRAIN_FLAGS)
  workdir = tmp_path / "w"
  summary = run_training("w", resume=True, iters=ITER + 11)
  assert summary["status"] == "completed"
  assert (f"Resumed from w/checkpoints/latest/{ITER + 1} at iteration {ITER + 1}"
          in capsys.readouterr().out)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["iter"] for r in records] == list(range(ITER + 2, ITER + 12))
  assert all(np.isfinite(r["train_loss"]) for r in records)
  assert json.loads((workdir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_default_shape_imports_samples_and_resumes(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
  vocab_size = len(randygpt_vocab(TEXT))
  rng = np.random.default_rng(3)
  weights = rgpt_weights(rng, vocab_size, n_embd=128, n_layer=6, block_size=64)
  zeros = {k: np.zeros_like(a) for k, a in weights.items()}
  write_rgpt(tmp_path / "checkpoint.bin", weights, zeros, zeros, vocab_size=vocab_size,
             iter_=999, step=1000)
  import_checkpoint("checkpoint.bin", "--workdir=w")
  assert "model: 6 layers, 8 heads, n_embd 128, block 64" in capsys.readouterr().out
  sample_in_process("--workdir=w", "--max_new_tokens=20")
  summary = run_training("w", resume=True, iters=1010, eval_iters=2)
  assert summary["status"] == "completed"
  assert "Resumed from w/checkpoints/latest/1000 at iteration 1000" in capsys.readouterr().out
  assert json.loads((tmp_path / "w" / "summary.json").read_text())["iters"] == 1010


def _corrupt(kind, path):
  raw = path.read_bytes()
  if kind == "magic":
    path.write_bytes(b"RGPT0009" + raw[8:])
  elif kind == "truncated":
    path.write_bytes(raw[:-1000])
  elif kind == "header":
    path.write_bytes(raw[:20])


@pytest.mark.parametrize("kind, args, message", [
    ("magic", [], "Bad magic bytes in checkpoint checkpoint.bin (expected RGPT0001 or RGPT0002 "
     "or RGPT0003, found b'RGPT0009')"),
    ("truncated", [], "checkpoint.bin is truncated: "),
    ("header", [], "checkpoint.bin is truncated: 20 bytes, less than the 24-byte header"),
    (None, ["--n_layer=3"], "Shapes that fit: --n_embd=32 --n_layer=2 --block_size=16"),
    (None, ["--data=other.txt"], "Checkpoint vocab_size 59 != vocab_size 6 of --data=other.txt"),
    (None, ["--data=missing.txt"], "--data=missing.txt does not exist."),
])
def test_refusals_are_one_line(checkpoint_file, tmp_path, monkeypatch, kind, args, message):
  monkeypatch.chdir(tmp_path)
  _corrupt(kind, checkpoint_file[0])
  (tmp_path / "other.txt").write_text("abc\n", encoding="utf-8")
  with raises_user_error(message):
    import_checkpoint("checkpoint.bin", "--data=c.txt", "--workdir=w", *SHAPE_FLAGS, *args)
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_the_command_takes_the_file_and_refuses_in_one_line(run_cli, checkpoint_file):
  """The command hands its one argument to the import, and its refusal is one line."""
  _corrupt("magic", checkpoint_file[0])
  assert_clean_error(run_cli("checkpoint.bin", "--data=c.txt", "--workdir=w", *SHAPE_FLAGS,
                             module="randygpt.import_bin"),
                     "Error: Bad magic bytes in checkpoint checkpoint.bin")


def test_refuses_a_workdir_with_checkpoints_and_a_missing_file_argument(checkpoint_file,
                                                                        monkeypatch):
  monkeypatch.chdir(checkpoint_file[0].parent)
  args = ["checkpoint.bin", "--data=c.txt", "--workdir=w", *SHAPE_FLAGS]
  import_checkpoint(*args)
  with raises_user_error("already holds checkpoints"):
    import_checkpoint(*args)
  import_checkpoint(*args, "--overwrite")
  with raises_user_error("Give one randyGPT checkpoint file"):
    import_checkpoint("--data=c.txt")
