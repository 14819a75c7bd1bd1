"""The token cache file's header: a magic, the header's size, then JSON (the format, the
vocabulary, the dtype, the token count and the tokens' checksum), padded; and the writer
that hashes the tokens as it writes them (cache.py builds and reads the file)."""

import hashlib
import json

from randygpt.data.bpe import BpeTokenizer
from randygpt.data.randygpt_bpe import RandygptBpeTokenizer

# Format 2 adds the SHA-256 of the tokens to the header.
CACHE_FORMAT = "randygpt-tokens-2"
MAGIC = b"RGTOKENS"
HEADER_ALIGN = 64
UNKNOWN = "0" * 64  # The checksum's place, until the tokens are written.


def header(tokenizer, n_tokens: int, size: int = 0, sha256: str = UNKNOWN, **split) -> bytes:
  """The header of a cache of `n_tokens` tokens (their bytes' `sha256`), padded to `size`
  bytes (at least). A character cache holds its characters; a BPE cache its tokenizer and
  its `split` (train_tokens, text_chars)."""
  if isinstance(tokenizer, BpeTokenizer):
    vocab = {"bpe": tokenizer.model, **split}
  elif isinstance(tokenizer, RandygptBpeTokenizer):
    vocab = {"randygpt_bpe": tokenizer.record(), **split}
  else:
    vocab = {"chars": list(tokenizer.chars)}
  meta = json.dumps({"format": CACHE_FORMAT, **vocab, "dtype": tokenizer.dtype.name,
                     "tokens": n_tokens, "sha256": sha256}).encode()
  size = max(size, -(-(len(MAGIC) + 8 + len(meta)) // HEADER_ALIGN) * HEADER_ALIGN)
  return (MAGIC + (size).to_bytes(8, "little") + meta).ljust(size, b" ")


class Hashing:
  """A file's writer that hashes what it writes (the tokens, for the header) as the cache's
  check does (cache._pieces_hash): the SHA-256 of its `piece_bytes` pieces' SHA-256s."""

  def __init__(self, out, piece_bytes: int):
    self.out, self.piece_bytes = out, piece_bytes
    self.pieces, self.piece, self.filled = [], hashlib.sha256(), 0

  def write(self, data: bytes) -> int:
    view = memoryview(data)
    while len(view):
      taken = view[:self.piece_bytes - self.filled]
      self.piece.update(taken)
      self.filled += len(taken)
      view = view[len(taken):]
      if self.filled == self.piece_bytes:
        self.pieces.append(self.piece.digest())
        self.piece, self.filled = hashlib.sha256(), 0
    return self.out.write(data)

  def hexdigest(self) -> str:
    last = [self.piece.digest()] if self.filled or not self.pieces else []
    return hashlib.sha256(b"".join(self.pieces + last)).hexdigest()
