"""The token cache: a text encoded once into a file keyed by its content (a header holding
the vocabulary, then the token ids), and the Corpus read from it."""

import codecs
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from randygpt.data import sources
from randygpt.data.token_file import TokenFile
from randygpt.data.tokenizers import CharTokenizer, _latin1, code_points
from randygpt.errors import UserError

CACHE_FORMAT = "randygpt-tokens-1"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A text's tokens in the token cache, and where they came from."""
  tokenizer: CharTokenizer
  tokens: TokenFile
  description: str  # For the header: the file, or the --data value and the file count.
  cache_path: Path
  built_s: float | None  # Seconds spent building the cache; None when it was reused.
  files: tuple[dict, ...]  # {"path", "bytes", "hash"} of each file, in order.

  @property
  def fingerprint(self) -> dict:
    """What the run's records keep about its text."""
    return {"files": list(self.files), "tokens": len(self.tokens)}


def content_hash(path: Path, piece_bytes: int = 64 << 20) -> str:
  """SHA-256 of the SHA-256s of the file's 64 MB pieces, hashed on every core (hashlib
  works outside the GIL): a hash of the content that takes half the time on two cores."""
  try:
    size = path.stat().st_size

    def piece(start: int) -> bytes:
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        f.seek(start)
        left = min(piece_bytes, size - start)
        while left > 0 and (chunk := f.read(min(sources.CHUNK_BYTES, left))):
          digest.update(chunk)
          left -= len(chunk)
      return digest.digest()

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      pieces = list(pool.map(piece, range(0, max(size, 1), piece_bytes)))
  except OSError as e:
    raise UserError(f"Cannot read --data={path}: {e.strerror}.") from None
  return hashlib.sha256(b"".join(pieces)).hexdigest()


def _cache_key(files: tuple[dict, ...], encoding: str, tokenizer: str) -> str:
  try:
    encoding = codecs.lookup(encoding).name
  except LookupError:
    raise UserError(f"Unknown --data_encoding={encoding}.") from None
  key = {"format": CACHE_FORMAT, "encoding": encoding, "tokenizer": tokenizer,
         "files": [f["hash"] for f in files]}
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _scan(files: list[Path], encoding: str, tokenizer: str) -> tuple[CharTokenizer, int]:
  """The vocabulary and the length in tokens of the text: the first of two passes. Most
  text is latin-1 (ASCII among it): there `bytes.translate` drops the characters already
  seen in one pass, and only what is left is counted."""
  seen, seen_latin1, n_chars = np.zeros(0x110000, bool), b"", 0
  for text in sources.text_chunks(files, encoding, tokenizer):
    latin1 = _latin1(text)
    if latin1 is not None:
      n_chars += len(latin1)
      rest = np.frombuffer(latin1.translate(None, seen_latin1), np.uint8)
    else:
      rest = code_points(text)
      n_chars += len(rest)
    if len(rest):
      seen[:int(rest.max()) + 1] |= np.bincount(rest) > 0
      seen_latin1 = np.flatnonzero(seen[:256]).astype(np.uint8).tobytes()
  text = "".join(map(chr, np.flatnonzero(seen)))
  if not text.strip():
    raise UserError(f"--data={', '.join(map(str, files))} is empty"
                    f"{' (only whitespace)' if text else ''}; it needs some text to learn from.")
  tok = CharTokenizer.randygpt(text) if tokenizer == "randygpt" else CharTokenizer.from_text(text)
  return tok, n_chars


def _encoded_chunks(files: list[Path], encoding: str, tokenizer: CharTokenizer,
                    tokenizer_name: str) -> Iterator[bytes]:
  """The token ids of the text, in pieces, as bytes of `tokenizer.dtype`: the second pass."""
  table = tokenizer.lookup_table()
  byte_table = None
  if tokenizer.dtype == np.uint8:  # bytes.translate maps a byte to a byte in one pass.
    byte_table = np.pad(table[:256], (0, max(0, 256 - len(table)))).tobytes()
  for text in sources.text_chunks(files, encoding, tokenizer_name):
    latin1 = _latin1(text) if byte_table else None
    yield latin1.translate(byte_table) if latin1 is not None else table[code_points(text)].tobytes()


_MAGIC = b"RGTOKENS"
_HEADER_ALIGN = 64


def _header(tokenizer: CharTokenizer, n_tokens: int) -> bytes:
  meta = json.dumps({"format": CACHE_FORMAT, "chars": list(tokenizer.chars),
                     "dtype": tokenizer.dtype.name, "tokens": n_tokens}).encode()
  size = -(-(len(_MAGIC) + 8 + len(meta)) // _HEADER_ALIGN) * _HEADER_ALIGN
  return (_MAGIC + (size).to_bytes(8, "little") + meta).ljust(size, b" ")


def open_cache(path: Path) -> tuple[CharTokenizer, TokenFile] | None:
  """The vocabulary and the tokens of a complete cache file; None for a missing, foreign or
  incomplete one."""
  try:
    with open(path, "rb") as f:
      head = f.read(len(_MAGIC) + 8)
      size = int.from_bytes(head[len(_MAGIC):], "little")
      if head[:len(_MAGIC)] != _MAGIC or size > 1 << 30:
        return None
      meta = json.loads(f.read(size - len(head)))
    dtype = np.dtype(meta["dtype"])
    expected_bytes = size + meta["tokens"] * dtype.itemsize
    if meta["format"] != CACHE_FORMAT or path.stat().st_size != expected_bytes:
      return None
    tokens = TokenFile(path, size, dtype, 0, meta["tokens"])
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return CharTokenizer(tuple(meta["chars"])), tokens


def build_cache(path: Path, files: list[Path], encoding: str, tokenizer_name: str) -> None:
  """Encodes the text into the cache file `path`: written under a temporary name and renamed
  when complete, so that a reader never trusts half a file and two runs building the same
  cache at once both succeed. The text is read twice (its vocabulary, then its tokens): a
  text that changes in between is refused."""
  before = [_stamp(f) for f in files]
  tokenizer, n_tokens = _scan(files, encoding, tokenizer_name)
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    header = _header(tokenizer, n_tokens)
    with os.fdopen(fd, "wb") as out:
      out.write(header)
      try:
        for chunk in _encoded_chunks(files, encoding, tokenizer, tokenizer_name):
          out.write(chunk)
      except IndexError:  # A character the first pass did not see.
        n_tokens = -1
      written = out.tell() - len(header)
    if written != n_tokens * tokenizer.dtype.itemsize or [_stamp(f) for f in files] != before:
      changed = next((f for f, s in zip(files, before) if _stamp(f) != s), files[0])
      raise UserError(f"--data={changed} changed while its token cache was built; run again "
                      "once it no longer changes.")
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f"Could not write the token cache {path} ({e.strerror}). Set "
                    "RANDYGPT_CACHE to a writable directory with free space (e.g. on another "
                    "disk).") from None
  finally:
    if tmp:
      Path(tmp).unlink(missing_ok=True)


def _stamp(path: Path) -> tuple[int, int]:
  """A file's size and modification time: what a writer changes."""
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns


def load_corpus(data: str, cache_dir: Path, *, url: str = "", encoding: str = "utf-8",
                tokenizer: str = "chars", sample_fallback: bool = True) -> Corpus:
  """The tokens of the text --data names, from the token cache in `cache_dir` (built on
  first use)."""
  paths, description = sources.resolve_sources(data, url, sample_fallback)
  files = tuple({"path": str(p), "bytes": p.stat().st_size, "hash": content_hash(p)}
                for p in paths)
  path = cache_dir / f"{_cache_key(files, encoding, tokenizer)[:32]}.tokens"
  built_s = None
  if (opened := open_cache(path)) is None:
    start = time.perf_counter()
    print(f"Encoding {description} into the token cache...", flush=True)
    build_cache(path, paths, encoding, tokenizer)
    built_s = time.perf_counter() - start
    opened = open_cache(path)
  return Corpus(opened[0], opened[1], description, path, built_s, files)
