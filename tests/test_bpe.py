"""The byte-pair tokenizer (data/bpe.py): the split by characters that every tokenizer
shares, bits per character, and a BPE run: resumed, sampled without its text, refused."""

import json
import math
import shutil

import numpy as np
import pytest

from randygpt import checkpoint, data

from conftest import (make_corpus, raises_user_error, read_metrics, run_training,
                      sample_in_process, tiny, write_corpus)

BPE = {"tokenizer": "bpe", "bpe_vocab_size": 80}


def load(path, cache, tokenizer, **values):
  return data.load_corpus(str(path), cache, tokenizer=tokenizer, **values)


@pytest.mark.parametrize("tokenizer, values", [("chars", {}), ("bpe", {"bpe_vocab_size": 60}),
                                               ("bpe", {"bpe_vocab_size": 200})])
def test_every_tokenizer_splits_the_same_characters(tmp_path, tokenizer, values):
  text = make_corpus(5000)
  path = tmp_path / "t.txt"
  path.write_text(text, encoding="utf-8")
  corpus = load(path, tmp_path / "cache", tokenizer, **values)
  train, val = corpus.split(16)
  n_train = data.train_length(len(text))
  assert corpus.tokenizer.decode(np.asarray(val)) == text[n_train:]
  assert corpus.tokenizer.decode(np.asarray(train)) == text[:n_train]
  assert corpus.text_chars == (n_train, len(text) - n_train)
  if tokenizer == "bpe":
    assert corpus.tokenizer.vocab_size == values["bpe_vocab_size"]
    assert len(corpus.tokens) < len(text)  # Merges: fewer tokens than characters.


def test_bits_per_character_is_the_loss_per_character_in_bits(tmp_path):
  assert data.bits_per_character(2 * math.log(2), 3, 6) == 1.0
  path = write_corpus(tmp_path / "t.txt")
  chars = load(path, tmp_path / "cache", "chars")
  assert chars.val_bpc(1.5) == 1.5 / math.log(2)  # One token a character.
  bpe = load(path, tmp_path / "cache", "bpe", bpe_vocab_size=70)
  _, val = bpe.split(16)
  val_chars = len(bpe.tokenizer.decode(np.asarray(val)))
  assert bpe.val_bpc(1.5) == pytest.approx(1.5 * len(val) / val_chars / math.log(2), rel=1e-12)
  assert len(val) < val_chars


def test_pieces_cut_after_newlines_encode_as_the_whole_text(tmp_path):
  text = make_corpus(3000) + "\n\n  indented\tline   with  spaces \n" * 3
  tokenizer = data.bpe.train([text], "".join(sorted(set(text))), 90)
  pieces = list(data.bpe.line_pieces([text[:700], text[700:1900], text[1900:]], size=50))
  assert "".join(pieces) == text and len(pieces) > 10
  assert all(p.endswith("\n") for p in pieces[:-1])
  whole = tokenizer.encode(text)
  assert np.array_equal(tokenizer.encode_pieces(pieces), whole)
  assert tokenizer.decode(whole) == text
  again = data.bpe.train([text[:1000], text[1000:]], "".join(sorted(set(text))), 90)
  assert again == tokenizer  # The same text in other pieces: the same tokenizer.


def test_a_vocabulary_below_the_characters_is_refused(tmp_path):
  path = write_corpus(tmp_path / "t.txt")
  n_chars = len(set(make_corpus()))
  with raises_user_error(f"--bpe_vocab_size=20 is below the text's {n_chars} distinct "
                         "characters"):
    load(path, tmp_path / "cache", "bpe", bpe_vocab_size=20)


def test_a_bpe_run_resumes_bit_exactly_samples_without_its_text_and_is_refused_chars(
    tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  write_corpus(tmp_path / "c.txt")
  run = tiny(data="c.txt", log_interval=5, eval_interval=10, checkpoint_interval=10,
             prompt=("ANNA:",), **BPE)
  run_training("one", **(run | {"iters": 20}))
  run_training("two", **(run | {"iters": 10}))
  assert run_training("two", iters=20, resume=True)["status"] == "completed"
  same = ("iter", "train_loss", "val_loss", "eval_train_loss", "lr", "val_bpc")
  records = read_metrics(tmp_path / "one")
  assert ([{k: r.get(k) for k in same} for r in read_metrics(tmp_path / "two")]
          == [{k: r.get(k) for k in same} for r in records])
  samples = (tmp_path / "one" / "samples.txt").read_text(encoding="utf-8")
  assert (tmp_path / "two" / "samples.txt").read_text(encoding="utf-8") == samples

  corpus = load("c.txt", tmp_path / "cache", "bpe", bpe_vocab_size=80)
  evals = [r for r in records if "val_loss" in r]
  assert [r["val_bpc"] for r in evals] == [corpus.val_bpc(r["val_loss"]) for r in evals]
  summary = json.loads((tmp_path / "one" / "summary.json").read_text())
  assert summary["best_val_bpc"] == min(r["val_bpc"] for r in evals)
  assert "bpc" in capsys.readouterr().out
  saved = json.loads((tmp_path / "one" / "tokenizer.json").read_text(encoding="utf-8"))
  assert saved == json.loads(corpus.tokenizer.model)
  latest = checkpoint.Checkpoints(tmp_path / "one").path("latest")
  assert checkpoint.saved_tokenizer(checkpoint.read_meta(latest)) == corpus.tokenizer

  (tmp_path / "c.txt").unlink()
  shutil.rmtree(tmp_path / "cache")
  capsys.readouterr()
  sample_in_process("--workdir=one", "--checkpoint=latest", "--prompt=ANNA:",
                    "--max_new_tokens=20")
  assert samples.split("\n\n")[0] in capsys.readouterr().out

  write_corpus(tmp_path / "c.txt")
  with raises_user_error("has tokenizer=bpe (flag: chars)"):
    run_training("two", iters=30, resume=True, tokenizer="chars")


def test_a_long_training_split_is_learnt_from_pieces_spread_over_it():
  pieces = [f"{i:09d}\n" for i in range(1000)]  # 10 characters each.
  kept = list(data.bpe.spread(pieces, 10_000, budget=1000))
  assert 100 <= len(kept) <= 101
  numbers = [int(piece) for piece in kept]
  assert numbers[0] < 10 and numbers[-1] >= 980  # From the start to the end.
  assert max(b - a for a, b in zip(numbers, numbers[1:])) <= 11
  assert list(data.bpe.spread(pieces, 10_000, budget=10_000)) == pieces
