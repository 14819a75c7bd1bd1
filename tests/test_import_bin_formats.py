"""`python -m randygpt.import_bin` on randyGPT's later checkpoints: RGPT0002 (v0.8.0, no Adam
moments) and RGPT0003 (v0.8.5 on: every m, then every v), with a character vocabulary or
randyGPT's BPE (--bpe_vocab); RGPT0004 refused. The files are written here from randyGPT's
src/checkpoint.rs (serialize_checkpoint_v2, serialize_checkpoint_v3), and where a copy of
randyGPT is at hand (RANDYGPT_RS_GIT) the writer is checked against its own
scripts/write_rgpt_checkpoint.py, byte for byte."""

import json
import types

import jax
import numpy as np
import pytest

import reference
from randygpt import import_bin, model, optim
from randygpt.config import ModelConfig, TrainConfig

from conftest import raises_user_error, restored_state, run_training, sample_in_process
from test_import_bin import (ITER, SHAPE, SHAPE_FLAGS, STEP, TEXT, TRAIN_FLAGS, import_checkpoint,
                             randygpt_vocab, reference_logits, rgpt_weights)
from test_randygpt_bpe import load_module, oracle_scripts, rust_encode, rust_train

# randyGPT v0.8's default shape (config.rs at v0.8.0) and v0.9.3's model-xs.
V08_SHAPE = {"n_embd": 256, "n_head": 8, "n_layer": 6, "block_size": 64}
XS_SHAPE = {"n_embd": 116, "n_head": 4, "n_layer": 3, "block_size": 256}


def write_rgpt(path, magic, weights, m=None, v=None, *, vocab_size, iter_=ITER, step=STEP,
               best_loss=1.25):
  """An RGPT file as checkpoint.rs writes it: the 24-byte header, the weights (wte, wpe,
  lm_head, per layer wq wk wv wo fc1 fc2), then for RGPT0003 every m and every v in the
  weights' order, for RGPT0001 each weight's m and v in turn, for RGPT0002 nothing."""
  with open(path, "wb") as f:
    f.write(magic)
    np.array([vocab_size, iter_, step], "<u4").tofile(f)
    np.array([best_loss], "<f4").tofile(f)
    tail = []
    if magic == b"RGPT0001":
      tail = [x[k] for k in weights for x in (m, v)]
    elif magic == b"RGPT0003":
      tail = [*m.values(), *v.values()]
    for w in [*weights.values(), *tail]:
      w.astype("<f4").tofile(f)
  return path


def moments(weights, seed=0):
  rng = np.random.default_rng(seed)
  m = {k: 0.01 * rng.standard_normal(a.shape).astype(np.float32) for k, a in weights.items()}
  v = {k: 1e-4 * rng.random(a.shape).astype(np.float32) for k, a in weights.items()}
  return m, v


def shape_flags(shape):
  return [f"--{k}={val}" for k, val in shape.items()]


@pytest.mark.parametrize("magic", [b"RGPT0001", b"RGPT0002", b"RGPT0003"])
def test_each_format_reads_its_moments_layout(tmp_path, magic):
  weights = rgpt_weights(np.random.default_rng(2), 9, **SHAPE)
  path = write_rgpt(tmp_path / "x.bin", magic, weights, {k: 2 * a for k, a in weights.items()},
                    {k: a * a for k, a in weights.items()}, vocab_size=9)
  header = import_bin.read_header(path)
  fmt = import_bin.file_format(header)
  config = ModelConfig(vocab_size=9, **SHAPE)
  import_bin.check_size(path, config, fmt)
  params, mu, nu = import_bin.read_tensors(path, config, fmt)
  if magic == b"RGPT0002":
    assert mu is None and nu is None
    return
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(m, 2 * p), params, mu)
  jax.tree.map(lambda p, n: np.testing.assert_array_equal(n, p * p), params, nu)


@pytest.fixture
def text_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "c.txt").write_bytes(TEXT.encode("utf-8"))
  return tmp_path / "c.txt"


def test_first_step_after_an_rgpt0003_import_is_one_adamw_step_from_its_moments(text_file):
  """The imported checkpoint's state, restored as --resume restores it, updated by the run's
  optimizer (randygpt's AdamW: global clipping, decay of the matrices) equals one AdamW step
  of tests/reference.py from the file's m, v and step, at the schedule's rate for the
  iteration after the file's."""
  vocab_size = len(randygpt_vocab(TEXT))
  weights = rgpt_weights(np.random.default_rng(0), vocab_size, **SHAPE)
  m, v = moments(weights)
  write_rgpt(text_file.parent / "c.bin", b"RGPT0003", weights, m, v, vocab_size=vocab_size)
  import_checkpoint("c.bin", "--data=c.txt", "--workdir=w", *SHAPE_FLAGS, "--lr_decay_iters=100")
  state = restored_state(text_file.parent / "w")
  # The file's arrays in randygpt's tree (the mapping the forward test checks).
  params, mu, nu = (import_bin.to_params(list(x.values()), SHAPE["n_layer"])
                    for x in (weights, m, v))
  tc = TrainConfig(beta1=0.9, beta2=0.999, lr_decay_iters=100, iters=ITER + 1)
  grads = jax.tree.map(lambda p: np.random.default_rng(p.size).standard_normal(p.shape)
                       .astype(np.float32), params)
  updates, _ = jax.jit(optim.make_optimizer(tc).update)(grads, state["opt"], state["params"])

  clipped = reference.clip_by_global_norm(reference.float64(grads), tc.grad_clip)
  lr = reference.learning_rate(ITER + 1, tc)
  assert 0 < lr < tc.learning_rate  # Past the warmup, on the cosine.

  def expected(path, p, g, m_, v_):
    direction, _ = reference.adam_direction(g, (m_, v_, STEP), 0.9, 0.999)
    decay = 0.0 if path[0].key in reference.NO_DECAY else tc.weight_decay
    return -lr * (direction + decay * p)
  want = jax.tree_util.tree_map_with_path(expected, reference.float64(params), clipped,
                                          reference.float64(mu), reference.float64(nu))
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=2e-4, atol=1e-9),
               updates, want)


def test_rgpt0002_starts_its_moments_at_zero_and_says_so(text_file, capsys):
  vocab_size = len(randygpt_vocab(TEXT))
  weights = rgpt_weights(np.random.default_rng(0), vocab_size, **SHAPE)
  write_rgpt(text_file.parent / "c.bin", b"RGPT0002", weights, vocab_size=vocab_size)
  import_checkpoint("c.bin", "--data=c.txt", "--workdir=w", *SHAPE_FLAGS)
  out = capsys.readouterr().out
  assert "(RGPT0002, randyGPT v0.8.0 (Metal))" in out
  assert (f"RGPT0002 keeps no Adam moments: they start at zero, with Adam step {STEP} carried"
          in out)
  adam = restored_state(text_file.parent / "w")["opt"][1][0]  # clip, (adam, ...) as optim.
  assert int(adam.count) == STEP
  assert all(not np.asarray(x).any() for x in jax.tree.leaves((adam.mu, adam.nu)))


def greedy_continuation(weights, vocab, prompt_ids, n_layer, n_head, steps=8):
  tokens = list(prompt_ids)
  for _ in range(steps):
    tokens.append(int(np.argmax(reference_logits(weights, np.array(tokens), n_layer,
                                                 n_head)[-1])))
  return "".join(vocab[i] for i in tokens if i > 1)


def import_bpe(tmp_path, shape, magic=b"RGPT0003", seed=0):
  """A BPE model of `shape` in an RGPT file, its vocab.json randyGPT's trainer's for TEXT,
  imported into w/; returns (weights, vocab file)."""
  vocab_file = rust_train(TEXT.replace("\r", ""), 110)
  (tmp_path / "vocab.json").write_text(json.dumps(vocab_file), encoding="utf-8")
  weights = rgpt_weights(np.random.default_rng(seed), 110, **shape)
  write_rgpt(tmp_path / "b.bin", magic, weights, *moments(weights), vocab_size=110)
  import_checkpoint("b.bin", "--data=c.txt", "--bpe_vocab=vocab.json", "--workdir=w",
                    *shape_flags(shape), *TRAIN_FLAGS)
  return weights, vocab_file


def test_bpe_import_keeps_randygpts_tokens_and_samples_as_its_model(text_file, capsys):
  tmp_path = text_file.parent
  weights, vocab_file = import_bpe(tmp_path, SHAPE)
  out = capsys.readouterr().out
  assert "tokens | vocab 110 (randyGPT's byte pairs," in out
  flags_cfg = set((tmp_path / "w" / "flags.cfg").read_text().splitlines())
  assert {"--tokenizer=randygpt-bpe", f"--bpe_vocab={tmp_path / 'vocab.json'}"} <= flags_cfg
  assert json.loads((tmp_path / "w" / "randygpt_bpe.json").read_text("utf-8")) == vocab_file

  prompt = "ANNA"
  ids = rust_encode(vocab_file, prompt)
  sample_in_process("--workdir=w", f"--prompt={prompt}", "--max_new_tokens=8",
                    "--temperature=0")
  expected = greedy_continuation(weights, vocab_file["vocab"], ids, SHAPE["n_layer"],
                                 SHAPE["n_head"])
  assert "\n" + expected + "\n" in capsys.readouterr().out


@pytest.mark.slow
def test_bpe_import_resumes_on_randygpts_tokens(text_file, capsys):
  import_bpe(text_file.parent, SHAPE)
  summary = run_training("w", resume=True, iters=ITER + 4)
  assert summary["status"] == "completed"
  assert f"Resumed from w/checkpoints/latest/{ITER + 1}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("magic, shape, bpe", [(b"RGPT0002", V08_SHAPE, False),
                                               (b"RGPT0003", V08_SHAPE, False),
                                               (b"RGPT0003", XS_SHAPE, False),
                                               (b"RGPT0003", XS_SHAPE, True)])
def test_randygpt_shapes_import_sample_and_resume(text_file, capsys, magic, shape, bpe):
  """v0.8's default shape in RGPT0002 and RGPT0003 with characters, and v0.9.3's model-xs
  (block 256) in RGPT0003 with characters and with BPE: imported, sampled, resumed for 3
  iterations."""
  tmp_path = text_file.parent
  text_file.write_bytes((TEXT * 4).encode("utf-8"))  # Splits of 257 tokens for block 256.
  if bpe:
    import_bpe(tmp_path, shape, magic)
  else:
    vocab_size = len(randygpt_vocab(TEXT))
    weights = rgpt_weights(np.random.default_rng(3), vocab_size, **shape)
    write_rgpt(tmp_path / "c.bin", magic, weights, *moments(weights), vocab_size=vocab_size)
    import_checkpoint("c.bin", "--data=c.txt", "--workdir=w", *shape_flags(shape), *TRAIN_FLAGS)
  params = model.n_params(ModelConfig(vocab_size=110 if bpe else len(randygpt_vocab(TEXT)),
                                      **shape))
  assert f"block {shape['block_size']} | {params:,} parameters" in capsys.readouterr().out
  sample_in_process("--workdir=w", "--max_new_tokens=20")
  summary = run_training("w", resume=True, iters=ITER + 4, eval_iters=1, batch_size=2)
  assert summary["status"] == "completed"


@pytest.fixture
def bin_file(text_file):
  vocab_size = len(randygpt_vocab(TEXT))
  weights = rgpt_weights(np.random.default_rng(0), vocab_size, **SHAPE)
  return write_rgpt(text_file.parent / "c.bin", b"RGPT0003", weights, *moments(weights),
                    vocab_size=vocab_size)


@pytest.mark.parametrize("change, args, message", [
    (lambda raw: b"RGPT0004" + raw[8:], [], "c.bin is an RGPT0004 checkpoint, randyGPT's "
     "mixture-of-experts model (v0.9.8), whose experts randygpt's model does not have: only "
     "RGPT0001, RGPT0002, RGPT0003 checkpoints can be imported."),
    (lambda raw: raw[:-4000], [], "c.bin is truncated: "),
    (lambda raw: b"RGPT0002" + raw[8:], [], "and no other shape fits: it is not a whole "
     "RGPT0002 checkpoint."),  # Moments after the weights: three times an RGPT0002's size.
    (None, ["--n_embd=64"], "Shapes that fit: --n_embd=32 --n_layer=2 --block_size=16"),
    (None, ["--bpe_vocab=vocab.json"], "Checkpoint vocab_size 59 != the 110 tokens of "
     "--bpe_vocab=vocab.json: c.bin was trained with another vocabulary."),
    (None, ["--bpe_vocab=c.txt"], "--bpe_vocab=c.txt is not randyGPT's vocab.json"),
])
def test_refusals_are_one_line_and_write_nothing(bin_file, change, args, message):
  if change:
    bin_file.write_bytes(change(bin_file.read_bytes()))
  (bin_file.parent / "vocab.json").write_text(json.dumps(rust_train(TEXT, 110)), "utf-8")
  with raises_user_error(message):
    import_checkpoint("c.bin", "--data=c.txt", "--workdir=w", *SHAPE_FLAGS, *args)
  assert not (bin_file.parent / "w").exists()


def test_a_bpe_checkpoint_without_its_vocab_json_is_refused_with_the_hint(text_file):
  tmp_path = text_file.parent
  weights = rgpt_weights(np.random.default_rng(0), 110, **SHAPE)
  write_rgpt(tmp_path / "b.bin", b"RGPT0003", weights, *moments(weights), vocab_size=110)
  with raises_user_error("(and --bpe_vocab=vocab.json for a byte-pair model)"):
    import_checkpoint("b.bin", "--data=c.txt", "--workdir=w", *SHAPE_FLAGS)


def test_the_writer_is_randygpts_own(tmp_path):
  """scripts/write_rgpt_checkpoint.py (randyGPT's, from PyTorch modules and AdamW state)
  writes the file this module's writer writes, byte for byte."""
  torch = pytest.importorskip("torch")
  script = load_module(oracle_scripts(tmp_path) / "write_rgpt_checkpoint.py")
  weights = rgpt_weights(np.random.default_rng(5), 11, **SHAPE)
  m, v = moments(weights)
  names = {"wte": "wte.weight", "wpe": "wpe.weight", "lm_head": "lm_head.weight"}
  for i in range(SHAPE["n_layer"]):
    names |= {f"{i}.{w}": f"layers.{i}.{part}.{w}.weight" for part, ws in
              (("attn", ("wq", "wk", "wv", "wo")), ("mlp", ("fc1", "fc2"))) for w in ws}
  tensors = {names[k]: torch.nn.Parameter(torch.from_numpy(a)) for k, a in weights.items()}
  fake_model = types.SimpleNamespace(named_parameters=lambda: tensors.items())
  state = {tensors[names[k]]: {"exp_avg": torch.from_numpy(m[k]),
                               "exp_avg_sq": torch.from_numpy(v[k])} for k in weights}
  cfg = types.SimpleNamespace(vocab_size=11, **SHAPE)
  script.write_rgpt_checkpoint(fake_model, types.SimpleNamespace(state=state),
                               str(tmp_path / "theirs.bin"), iter_num=ITER, step=STEP,
                               best_loss=1.25, cfg=cfg)
  ours = write_rgpt(tmp_path / "ours.bin", b"RGPT0003", weights, m, v, vocab_size=11)
  assert (tmp_path / "theirs.bin").read_bytes() == ours.read_bytes()
