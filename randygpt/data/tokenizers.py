"""The character tokenizer: one token per code point of the training text (the research
core; it reads no files)."""

import dataclasses
import json
from pathlib import Path

import numpy as np

from randygpt.data.randygpt_text import RANDYGPT_SLOTS


def id_dtype(vocab_size: int, smallest=np.uint8) -> np.dtype:
  """The smallest unsigned type, from `smallest` up, that holds every id of `vocab_size`
  tokens (the BPE tokenizers' caches start at uint16)."""
  for dtype in (np.uint8, np.uint16):
    if np.iinfo(dtype).bits >= np.iinfo(smallest).bits and vocab_size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  return np.dtype(np.uint32)


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """One token per Unicode code point present in the training text, in sorted order."""
  chars: tuple[str, ...]

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    return cls(tuple(sorted(set(text))))

  @classmethod
  def randygpt(cls, text: str) -> "CharTokenizer":
    """randyGPT's vocabulary: `<` (BOS) and `>` (EOS), then the sorted characters of `text`,
    `<` and `>` again among them when the text has them."""
    return cls(RANDYGPT_SLOTS + tuple(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  @property
  def dtype(self) -> np.dtype:
    return id_dtype(self.vocab_size)

  def record(self) -> None:
    """A checkpoint keeps the characters alone (its "vocab"), nothing more."""
    return None

  def missing(self, text: str) -> list[str]:
    """Characters of `text` the vocabulary cannot encode, in order of first appearance."""
    known = set(self.chars)
    return list(dict.fromkeys(c for c in text if c not in known))

  def lookup_table(self) -> np.ndarray:
    """Token id by code point. A character listed twice (randyGPT's `<` and `>`) takes its
    last id, as randyGPT's encoder does: its BOS and EOS ids never come from the text."""
    table = np.zeros(max(map(ord, self.chars)) + 1, self.dtype)
    table[[ord(c) for c in self.chars]] = np.arange(self.vocab_size)
    return table

  def encode(self, text: str) -> np.ndarray:
    return self.lookup_table()[code_points(text)]

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).tolist())

  def save(self, path: Path) -> None:
    path.write_text(json.dumps({"chars": list(self.chars)}, ensure_ascii=False), encoding="utf-8")

  @classmethod
  def load(cls, path: Path) -> "CharTokenizer":
    return cls(tuple(json.loads(path.read_text(encoding="utf-8"))["chars"]))


def code_points(text: str) -> np.ndarray:
  """The code points of `text` in the narrowest of uint8, uint16 and uint32 that holds them:
  copies of the string's own storage where CPython allows (latin-1, UTF-16 without
  surrogates), not a loop over characters."""
  if (latin1 := _latin1(text)) is not None:
    return np.frombuffer(latin1, np.uint8)
  units = np.frombuffer(text.encode("utf-16-le", "surrogatepass"), np.uint16)
  if not ((units >= 0xD800) & (units < 0xE000)).any():
    return units
  return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def _latin1(text: str) -> bytes | None:
  """`text` as one byte per character when every code point is below 256 (a copy)."""
  try:
    return text.encode("latin-1")
  except UnicodeEncodeError:
    return None
