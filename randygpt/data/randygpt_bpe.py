"""randyGPT's byte-pair tokenizer (`--tokenizer=randygpt-bpe --bpe_vocab=vocab.json`): its
vocab.json read and its encoding reproduced, so that a model randyGPT trained on BPE tokens
continues here on the same tokens.

The rules, from randyGPT's src/tokenizer.rs (v0.9.2; its later reverse-map encoder gives the
same tokens when it ends: it loops forever where two merges make one id):
- vocab.json is {"vocab": [token strings by id], "merges": [[left, right], ...]}; a string
  listed twice takes its last id (a Rust HashMap collected from the list), and so do the
  single characters the text starts from; other characters are dropped.
- Each merge maps (id of left, id of right) to the id of left+right; the first merge of a
  pair is kept, a merge whose strings are not all in the vocabulary is skipped. Two merges
  can make the same string, and so the same id.
- A text is split at "\n" and each line encoded alone: the lowest merged id that an adjacent
  pair makes is applied to every pair that makes it, left to right without overlaps, until
  no pair makes one. The lines' tokens are joined with the id of "\n". randyGPT joins them
  with usize::MAX where "\n" is not in the vocabulary (an id no embedding has, which its
  training could not use); here, as in its Python port (scripts/tokenizer_randygpt.py), the
  newline is then dropped like any other character outside the vocabulary.
"""

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from randygpt.data.tokenizers import id_dtype
from randygpt.errors import UserError

BOS, EOS = "<|bos|>", "<|eos|>"
# Lines remembered with their tokens: texts repeat short lines (names, stage directions).
MEMO_LINES = 1 << 16


@dataclasses.dataclass(frozen=True)
class RandygptBpeTokenizer:
  """randyGPT's vocab.json: `chars` are its tokens by id (the strings they stand for),
  `merges` its merge rules in training order."""
  chars: tuple[str, ...]
  merges: tuple[tuple[str, str], ...]

  @classmethod
  def from_json(cls, text: str, source: str = "vocab.json") -> "RandygptBpeTokenizer":
    """The tokenizer of a vocab.json's text; a file of another shape is refused."""
    try:
      found = json.loads(text)
      vocab, merges = found["vocab"], found["merges"]
      ok = (all(isinstance(s, str) and s for s in vocab)
            and all(len(m) == 2 and all(isinstance(s, str) for s in m) for m in merges))
    except (ValueError, KeyError, TypeError):
      ok = False
    if not ok or not vocab:
      raise UserError(f"--bpe_vocab={source} is not randyGPT's vocab.json ({{\"vocab\": "
                      "[token strings], \"merges\": [[left, right], ...]}).")
    return cls(tuple(vocab), tuple((m[0], m[1]) for m in merges))

  @classmethod
  def from_record(cls, record: dict) -> "RandygptBpeTokenizer":
    """The tokenizer `record()` describes."""
    return cls(tuple(record["vocab"]), tuple((m[0], m[1]) for m in record["merges"]))

  @classmethod
  def from_file(cls, path: Path) -> "RandygptBpeTokenizer":
    try:
      text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"Cannot read --bpe_vocab={path}: "
                      f"{getattr(e, 'strerror', None) or e}.") from None
    return cls.from_json(text, str(path))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  @property
  def dtype(self) -> np.dtype:
    return id_dtype(self.vocab_size, np.uint16)

  def record(self) -> dict:
    """What a checkpoint's metadata keeps: enough to sample without the files."""
    return {"kind": "randygpt-bpe", "vocab": list(self.chars),
            "merges": [list(m) for m in self.merges]}

  def missing(self, text: str) -> list[str]:
    """Characters of `text` that encoding drops, in order of first appearance."""
    return list(dict.fromkeys(c for c in text if c not in self._tables()[0]))

  def encode(self, text: str) -> np.ndarray:
    return np.concatenate(list(self.encode_pieces([text])))

  def encode_pieces(self, pieces: Iterable[str]) -> Iterator[np.ndarray]:
    """The tokens of the text made of `pieces`, some lines at a time: the text is split at
    every "\n", wherever the pieces are cut."""
    carry = ""
    for piece in pieces:
      lines = (carry + piece).split("\n")
      carry = lines.pop()
      if lines:
        yield self._encode_lines(lines, newline_after_last=True)
    yield self._encode_lines([carry], newline_after_last=False)

  def _encode_lines(self, lines: list[str], newline_after_last: bool) -> np.ndarray:
    newline = self._tables()[0].get("\n")
    ids: list[int] = []
    for i, line in enumerate(lines):
      ids.extend(self._encode_line(line))
      if newline is not None and (newline_after_last or i < len(lines) - 1):
        ids.append(newline)
    return np.asarray(ids, self.dtype)

  def decode(self, ids) -> str:
    """The tokens' strings, BOS and EOS left out (as randyGPT's decode does)."""
    token_to_id = self._tables()[0]
    special = {token_to_id.get(BOS, 0), token_to_id.get(EOS, 1)}
    return "".join(self.chars[i] for i in np.asarray(ids).tolist() if i not in special)

  def save(self, path: Path) -> None:
    """vocab.json (the tokens by id) at `path`, and randyGPT's own file beside it
    (randygpt_bpe.json) for randyGPT or --bpe_vocab."""
    path.write_text(json.dumps({"chars": list(self.chars)}, ensure_ascii=False),
                    encoding="utf-8")
    path.with_name("randygpt_bpe.json").write_text(json.dumps(
        {"vocab": list(self.chars), "merges": [list(m) for m in self.merges]},
        ensure_ascii=False), encoding="utf-8")

  def _tables(self) -> tuple[dict, dict, dict]:
    """Built once (a frozen dataclass's cache): string -> id (the last id of a string listed
    twice), (left id, right id) -> merged id, and the memo of encoded lines."""
    if "_token_to_id" not in self.__dict__:
      token_to_id = {s: i for i, s in enumerate(self.chars)}
      merge_map: dict[tuple[int, int], int] = {}
      for left, right in self.merges:
        ids = (token_to_id.get(left), token_to_id.get(right), token_to_id.get(left + right))
        if None not in ids:
          merge_map.setdefault(ids[:2], ids[2])
      object.__setattr__(self, "_token_to_id", token_to_id)
      object.__setattr__(self, "_merge_map", merge_map)
      object.__setattr__(self, "_memo", {})
    return self.__dict__["_token_to_id"], self.__dict__["_merge_map"], self.__dict__["_memo"]

  def _encode_line(self, line: str) -> list[int]:
    token_to_id, merge_map, memo = self._tables()
    if (known := memo.get(line)) is not None:
      return known
    ids = [token_to_id[c] for c in line if c in token_to_id]
    while len(ids) > 1:
      made = [merge_map.get(pair) for pair in zip(ids, ids[1:])]
      best = min((m for m in made if m is not None), default=None)
      if best is None:
        break
      out, i = [], 0
      while i < len(ids):
        if i < len(made) and made[i] == best:
          out.append(best)
          i += 2
        else:
          out.append(ids[i])
          i += 1
      ids = out
    if len(memo) >= MEMO_LINES:
      memo.clear()
    memo[line] = ids
    return ids
