"""randyGPT's BPE (`--tokenizer=randygpt-bpe`) against encoders written here from randyGPT's
src/tokenizer.rs, and, where a copy of randyGPT is at hand (RANDYGPT_RS_GIT: its git
directory), against its own Python port, scripts/tokenizer_randygpt.py."""

import importlib.util
import json
import os
import subprocess
from collections import Counter

import numpy as np
import pytest

from randygpt import data
from randygpt.data.randygpt_bpe import RandygptBpeTokenizer
from randygpt.errors import UserError

USIZE_MAX = 2**64 - 1


def rust_train(text: str, target_vocab: int) -> dict:
  """randyGPT's BpeTokenizer::train, written from tokenizer.rs: BOS and EOS, the sorted
  characters, then merges of the most frequent adjacent pair of the whole text (newlines
  included: training does not split lines), ties to the larger (left id, right id) as its
  max-heap of (count, left, right) pops them."""
  vocab = ["<|bos|>", "<|eos|>", *sorted(set(text))]
  token_to_id = {s: i for i, s in enumerate(vocab)}
  corpus = [token_to_id[c] for c in text]
  merges = []
  while len(vocab) < target_vocab:
    counts = Counter(zip(corpus, corpus[1:]))
    if not counts:
      break
    (left, right), _ = max(counts.items(), key=lambda kv: (kv[1], *kv[0]))
    new_id = len(vocab)
    merges.append([vocab[left], vocab[right]])
    vocab.append(vocab[left] + vocab[right])
    token_to_id[vocab[-1]] = new_id
    out, j = [], 0
    while j < len(corpus):
      if j + 1 < len(corpus) and (corpus[j], corpus[j + 1]) == (left, right):
        out.append(new_id)
        j += 2
      else:
        out.append(corpus[j])
        j += 1
    corpus = out
  return {"vocab": vocab, "merges": merges}


def rust_encode(vocab_file: dict, text: str) -> list[int]:
  """randyGPT v0.9.2's BpeTokenizer::encode, line for line: token_to_id collected from
  (string, id) pairs (the last id of a repeated string), merge_map's first entry of a pair,
  each "\\n"-split chunk encoded by repeatedly merging every pair that makes the minimum
  merged id, each chunk followed by the id of "\\n" (usize::MAX when it has none), the last
  one popped."""
  token_to_id = dict((s, i) for i, s in enumerate(vocab_file["vocab"]))
  merge_map = {}
  for left, right in vocab_file["merges"]:
    if left in token_to_id and right in token_to_id and left + right in token_to_id:
      merge_map.setdefault((token_to_id[left], token_to_id[right]), token_to_id[left + right])

  def encode_chunk(chunk):
    tokens = [token_to_id[c] for c in chunk if c in token_to_id]
    if len(tokens) < 2:
      return tokens
    while True:
      found = [merge_map[w] for w in zip(tokens, tokens[1:]) if w in merge_map]
      if not found:
        return tokens
      merged_id, out, i = min(found), [], 0
      while i < len(tokens):
        if i + 1 < len(tokens) and merge_map.get((tokens[i], tokens[i + 1])) == merged_id:
          out.append(merged_id)
          i += 2
        else:
          out.append(tokens[i])
          i += 1
      tokens = out

  nl_id = token_to_id.get("\n", USIZE_MAX)
  result = [t for line in text.split("\n") for t in [*encode_chunk(line), nl_id]]
  if result and result[-1] == nl_id:
    result.pop()
  return result


SHAKESPEARE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n"
               "Speak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to "
               "famish?\n\nAll:\nResolved. resolved.\n") * 3
UNICODE = "Ça va? Très bien — naïve café, 日本語のテキスト, emoji 🙂🙂 and aaaa bbbb\n" * 4
# Texts to encode: newlines (trailing, doubled, leading), characters the vocabularies lack.
TEXTS = [SHAKESPEARE, UNICODE, "\nSpeak, citizen!\n\n", "no newline at the end",
         "unknown: ~^ {} ¤ 🚀 \t tabs\r\n", "", "\n", "aaaaaaa", SHAKESPEARE[:57]]


def vocabularies() -> dict[str, dict]:
  """Vocabularies as randyGPT's trainer makes them, and edge cases made by hand: two merges
  that make one string ("abc" from ab+c and from a+bc), and one without "\\n"."""
  duplicate = {"vocab": ["<|bos|>", "<|eos|>", "\n", "a", "b", "c", "ab", "abc", "bc", "abc",
                         "abca"],
               "merges": [["a", "b"], ["ab", "c"], ["b", "c"], ["a", "bc"], ["abc", "a"]]}
  no_newline = rust_train(SHAKESPEARE.replace("\n", " "), 80)
  return {"shakespeare": rust_train(SHAKESPEARE, 120), "unicode": rust_train(UNICODE, 90),
          "duplicate": duplicate, "no_newline": no_newline}


def encoded(vocab_file: dict, text: str) -> list[int]:
  return RandygptBpeTokenizer.from_json(json.dumps(vocab_file)).encode(text).tolist()


@pytest.mark.parametrize("name", vocabularies())
def test_encoding_follows_randygpts_rules(name):
  vocab_file = vocabularies()[name]
  texts = TEXTS + ["abcabca bcab\nabcbc\n", "aabcbcabc"] * (name == "duplicate")
  for text in texts:
    # randyGPT's usize::MAX for a newline outside the vocabulary is dropped here.
    assert encoded(vocab_file, text) == [t for t in rust_encode(vocab_file, text)
                                         if t != USIZE_MAX], (name, text)


def test_the_rules_are_checked():
  """The cases above can fail: merges cross no newline, the minimum merged id goes first,
  a repeated string takes its last id, and a missing newline is usize::MAX in randyGPT."""
  vocab = vocabularies()
  # Training merged across newlines ("\n\n", ":\n" ...): encoding never does.
  assert any("\n" in left + right and left + right != "\n" for left, right
             in vocab["shakespeare"]["merges"])
  assert "\n\n" not in {vocab["shakespeare"]["vocab"][t]
                        for t in encoded(vocab["shakespeare"], SHAKESPEARE)}
  dup = vocab["duplicate"]
  assert encoded(dup, "abc") == [9]  # ab (6) first, then ab+c makes "abc", last id 9.
  assert encoded(dup, "abca") == [10]
  assert encoded(dup, "bcabc") == [8, 9]  # ab (6), then bc (8), then ab+c (9).
  assert rust_encode(dup, "a\nb") == [3, 2, 4]
  no_nl = vocab["no_newline"]
  assert USIZE_MAX in rust_encode(no_nl, "Speak\nspeak")
  assert "\n" not in RandygptBpeTokenizer.from_json(json.dumps(no_nl)).decode(
      encoded(no_nl, "Speak\nspeak"))


def test_decode_skips_bos_and_eos_and_round_trips_known_text():
  tok = RandygptBpeTokenizer.from_json(json.dumps(vocabularies()["shakespeare"]))
  assert tok.decode(tok.encode(SHAKESPEARE)) == SHAKESPEARE
  assert tok.decode([0, 1] + tok.encode("Speak").tolist()) == "Speak"
  assert tok.missing("Speak 🙂~") == ["🙂", "~"]
  assert tok.vocab_size == 120 and tok.dtype == np.uint16


@pytest.mark.parametrize("text", ['{"vocab": []}', "[1, 2]", "not json",
                                  '{"vocab": ["a", 3], "merges": []}',
                                  '{"vocab": ["a"], "merges": [["a"]]}'])
def test_a_file_of_another_shape_is_refused(text):
  with pytest.raises(UserError, match=r"^--bpe_vocab=v.json is not randyGPT's vocab.json"):
    RandygptBpeTokenizer.from_json(text, "v.json")


def oracle_scripts(tmp_path):
  """randyGPT's scripts/ from RANDYGPT_RS_GIT (a git directory, e.g. the fetch tool's
  mirror), copied into tmp_path: never committed here."""
  git_dir = os.environ.get("RANDYGPT_RS_GIT")
  if not git_dir:
    pytest.skip("RANDYGPT_RS_GIT (randyGPT's git directory) is not set: its own scripts "
                "are not at hand")
  for name in ("tokenizer_randygpt.py", "write_rgpt_checkpoint.py"):
    script = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:scripts/{name}"],
                            capture_output=True, text=True, check=True).stdout
    (tmp_path / name).write_text(script, encoding="utf-8")
  return tmp_path


def load_module(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", vocabularies())
def test_encoding_matches_randygpts_own_python_port(tmp_path, name):
  oracle = load_module(oracle_scripts(tmp_path) / "tokenizer_randygpt.py")
  vocab_file = vocabularies()[name]
  (tmp_path / "vocab.json").write_text(json.dumps(vocab_file), encoding="utf-8")
  theirs = oracle.RandyGPTTokenizer.from_file(str(tmp_path / "vocab.json"))
  ours = RandygptBpeTokenizer.from_file(tmp_path / "vocab.json")
  for text in TEXTS:
    assert ours.encode(text).tolist() == theirs.encode(text), (name, text)
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))


def test_pieces_cut_anywhere_encode_as_the_whole_text():
  tok = RandygptBpeTokenizer.from_json(json.dumps(vocabularies()["shakespeare"]))
  cuts = [0, 5, 14, 15, 16, 100, 101, 250, len(SHAKESPEARE)]
  pieces = [SHAKESPEARE[a:b] for a, b in zip(cuts, cuts[1:])]
  assert np.concatenate(list(tok.encode_pieces(pieces))).tolist() == encoded(
      vocabularies()["shakespeare"], SHAKESPEARE)


def test_the_corpus_is_randygpts_tokens_split_as_randygpt_splits_them(tmp_path, capsys):
  """--tokenizer=randygpt-bpe: the text as randyGPT reads it (lines, CRLF), its tokens as
  randyGPT encodes them, the first 90% of the tokens for training, bits per character
  counted from the characters the tokens stand for; unknown characters said once."""
  vocab_file = vocabularies()["shakespeare"]
  (tmp_path / "vocab.json").write_text(json.dumps(vocab_file), encoding="utf-8")
  text = SHAKESPEARE.replace("\n", "\r\n") * 4 + "Speak 🙂~"
  (tmp_path / "t.txt").write_bytes(text.encode("utf-8"))
  load = lambda: data.load_corpus(str(tmp_path / "t.txt"), tmp_path / "cache",
                                  tokenizer="randygpt-bpe", bpe_vocab=str(tmp_path / "vocab.json"))
  corpus = load()
  expected = rust_encode(vocab_file, text.replace("\r\n", "\n") + "\n")
  assert np.asarray(corpus.tokens).tolist() == expected
  assert corpus.train_tokens == len(expected) * 9 // 10
  lengths = [len(vocab_file["vocab"][t]) for t in expected]
  assert corpus.text_chars == (sum(lengths[:corpus.train_tokens]),
                               sum(lengths[corpus.train_tokens:]))
  assert "⚠ 2 characters of the text are not in the --bpe_vocab" in capsys.readouterr().out
  assert load().built_s is None and load().tokenizer == corpus.tokenizer  # The cache, reused.
  (tmp_path / "vocab.json").write_text(json.dumps(vocabularies()["unicode"]), encoding="utf-8")
  assert load().tokenizer.vocab_size == 90  # Another vocab.json, another cache.
  with pytest.raises(UserError, match="^--tokenizer=randygpt-bpe needs --bpe_vocab="):
    data.load_corpus(str(tmp_path / "t.txt"), tmp_path / "cache", tokenizer="randygpt-bpe")
