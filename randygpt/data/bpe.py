"""The byte-pair tokenizer (`--tokenizer=bpe --bpe_vocab_size=N`), made with Hugging Face
`tokenizers`: trained on the training split's text, its alphabet every character of the
whole text, so that every character of the text (the validation split's too) is a token.

Its tokens are substrings of the text: a text's tokens decode back to it exactly. The
pre-tokenizer cuts the text into words (a leading space kept), runs of other whitespace and
single newlines, and merges never cross those cuts: the trainer counts words, not the
text, so its memory grows with the distinct words (and the text it learns from is at most
TRAIN_CHARS characters, spread over the split), and a text cut after any newline encodes
exactly as the whole text does.
"""

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from randygpt.data.tokenizers import id_dtype
from randygpt.errors import UserError

# Newlines alone; words with their leading space; other whitespace, its last space left to
# the word after it (as GPT-2's pattern does).
PRE_TOKENIZER = r"\n| ?[^\s]+|[^\S\n]+(?![^\s])|[^\S\n]+"
PIECE_CHARS = 1 << 16  # Text given to the library at a time, cut after a newline.
# The most training text the tokenizer learns from: pieces spread evenly over a longer
# training split. The trainer holds every distinct word with about 32 bytes a character, and
# code has many distinct words: 190 MB of it went past 2.4 GB (docs/measurements.md,
# "Tokenizers").
TRAIN_CHARS = 32 << 20
# Text encoded in one call: the library's encodings of it (offsets, strings: some 100 bytes
# a token) are held until its ids are copied out.
ENCODE_CHARS = 1 << 20
# The cache key's name for the tokenizer: a change of the recipe here makes new caches.
RECIPE = "bpe-1"


def _empty() -> tokenizers.Tokenizer:
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(PRE_TOKENIZER), "isolated")
  return tokenizer


@dataclasses.dataclass(frozen=True)
class BpeTokenizer:
  """A trained byte-pair tokenizer: `chars` are its tokens by id (the strings they stand
  for), `model` the library's JSON of it."""
  model: str
  chars: tuple[str, ...]
  alphabet: frozenset[str]

  @classmethod
  def from_json(cls, model: str) -> "BpeTokenizer":
    vocab = json.loads(model)["model"]["vocab"]
    chars = tuple(sorted(vocab, key=vocab.get))
    return cls(model, chars, frozenset(c for c in chars if len(c) == 1))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  @property
  def dtype(self) -> np.dtype:
    return id_dtype(self.vocab_size, np.uint16)

  def record(self) -> dict:
    """What a checkpoint's metadata keeps: enough to sample without the text."""
    return {"kind": "bpe", "model": self.model}

  def missing(self, text: str) -> list[str]:
    return list(dict.fromkeys(c for c in text if c not in self.alphabet))

  def encode_pieces(self, pieces: Iterable[str]) -> np.ndarray:
    """The tokens of the text made of `pieces`, each cut after a newline (or the text's
    last), in one call on every core."""
    encodings = self._library().encode_batch(list(pieces), add_special_tokens=False)
    ids = [np.asarray(e.ids, self.dtype) for e in encodings]
    return np.concatenate(ids) if ids else np.zeros(0, self.dtype)

  def encode(self, text: str) -> np.ndarray:
    return self.encode_pieces([text])

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).tolist())

  def _library(self) -> tokenizers.Tokenizer:
    if "_tokenizer" not in self.__dict__:  # Built once; a frozen dataclass's cache.
      object.__setattr__(self, "_tokenizer", tokenizers.Tokenizer.from_str(self.model))
    return self.__dict__["_tokenizer"]

  def save(self, path: Path) -> None:
    """vocab.json (the tokens by id) at `path`, and tokenizer.json (the library's) beside."""
    path.write_text(json.dumps({"chars": list(self.chars)}, ensure_ascii=False),
                    encoding="utf-8")
    path.with_name("tokenizer.json").write_text(self.model, encoding="utf-8")


def line_pieces(texts: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
  """The text of `texts` again, in pieces of about `size` characters, each cut after a
  newline; text with no newline in 64 pieces is cut anyway."""
  carry = ""
  for text in texts:
    text, start = carry + text, 0
    while len(text) - start >= size and (cut := text.find("\n", start + size - 1) + 1):
      yield text[start:cut]
      start = cut
    carry = text[start:]
    if len(carry) >= 64 * size:
      yield carry
      carry = ""
  if carry:
    yield carry


def spread(pieces: Iterable[str], n_chars: int, budget: int = TRAIN_CHARS) -> Iterator[str]:
  """About `budget` characters of the pieces of a text of `n_chars`, spread evenly over it
  (a piece is kept while the kept text is behind an even pace); all of a shorter text."""
  seen = kept = 0
  for piece in pieces:
    seen += len(piece)
    if n_chars <= budget or kept * n_chars < budget * seen:
      kept += len(piece)
      yield piece


def train(texts: Iterable[str], alphabet: str, vocab_size: int,
          n_chars: int = 0) -> BpeTokenizer:
  """A tokenizer of `vocab_size` tokens trained on the text of `texts` (`n_chars` long; about
  TRAIN_CHARS of it, spread over it): `alphabet` (every character of the whole text), then
  the merges its words make most often."""
  if vocab_size < len(alphabet):
    raise UserError(f"--bpe_vocab_size={vocab_size} is below the text's {len(alphabet)} "
                    f"distinct characters: every character is a token. Use "
                    f"--bpe_vocab_size={len(alphabet)} or more.")
  tokenizer = _empty()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=sorted(alphabet),
                                show_progress=False)
  tokenizer.train_from_iterator(spread(line_pieces(texts), n_chars), trainer)
  return BpeTokenizer.from_json(tokenizer.to_str())
