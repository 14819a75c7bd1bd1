"""The token cache: a text encoded once into a file keyed by its content (a header holding
the vocabulary, then the token ids), and the Corpus read from it."""

import codecs
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from randygpt.data import bpe, cache_header, sources, trust, windowing
from randygpt.data.bpe import BpeTokenizer
from randygpt.data.randygpt_bpe import RandygptBpeTokenizer
from randygpt.data.token_file import TokenFile
from randygpt.data.tokenizers import CharTokenizer, _latin1, code_points
from randygpt.errors import UserError

@dataclasses.dataclass(frozen=True)
class Corpus:
  """A text's tokens in the token cache, and where they came from."""
  tokenizer: CharTokenizer | BpeTokenizer | RandygptBpeTokenizer
  tokens: TokenFile
  description: str  # For the header: the file, or the --data value and the file count.
  cache_path: Path
  built_s: float | None  # Seconds spent building the cache; None when it was reused.
  files: tuple[dict, ...]  # {"path", "bytes", "hash"} of each file, in order.
  train_tokens: int  # The tokens of the training split: the text's first 90% of characters.
  text_chars: tuple[int, int]  # The characters of the training and the validation split.

  def split(self, block_size: int):
    """The training and validation tokens: the text split by its characters, then
    tokenized, so that every tokenizer's validation text is the same."""
    return windowing.split(self.tokens, block_size, self.train_tokens)

  def val_bpc(self, loss: float) -> float:
    """A validation loss (nats per token) in bits per character of the validation text."""
    return windowing.bits_per_character(loss, len(self.tokens) - self.train_tokens,
                                        self.text_chars[1])

  @property
  def fingerprint(self) -> dict:
    """What the run's records keep about its text."""
    return {"files": list(self.files), "tokens": len(self.tokens)}


PIECE_BYTES = 64 << 20  # What one thread hashes at a time.


def content_hash(path: Path, piece_bytes: int = PIECE_BYTES, threads: int = 1) -> str:
  """SHA-256 of the SHA-256s of the file's 64 MB pieces, hashed on `threads` threads
  (hashlib works outside the GIL; the caller gives the CPUs this process may use,
  runtime/cores.py): a hash of the content that takes half the time on two cores."""
  try:
    return _pieces_hash(path, 0, piece_bytes, threads)
  except OSError as e:
    raise UserError(f"Cannot read --data={path}: {e.strerror}.") from None


def _pieces_hash(path: Path, start: int, piece_bytes: int = 0, threads: int = 1) -> str:
  """content_hash of the file's bytes from `start` on; OSError when it cannot be read."""
  end, piece_bytes = path.stat().st_size, piece_bytes or PIECE_BYTES

  def piece(offset: int) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      f.seek(offset)
      left = min(piece_bytes, end - offset)
      while left > 0 and (chunk := f.read(min(sources.CHUNK_BYTES, left))):
        digest.update(chunk)
        left -= len(chunk)
    return digest.digest()

  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    pieces = list(pool.map(piece, range(start, max(end, start + 1), piece_bytes)))
  return hashlib.sha256(b"".join(pieces)).hexdigest()


def _cache_key(files: tuple[dict, ...], encoding: str, tokenizer: str) -> str:
  try:
    encoding = codecs.lookup(encoding).name
  except LookupError:
    raise UserError(f"Unknown --data_encoding={encoding}.") from None
  key = {"format": cache_header.CACHE_FORMAT, "encoding": encoding, "tokenizer": tokenizer,
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


def open_cache(path: Path, verify: bool = True, threads: int = 1):
  """The tokenizer, the tokens and the header of a complete cache file; None for a missing,
  foreign, incomplete or untrusted one (a link, or a file another user could write:
  trust.py), and "damaged" for one whose tokens differ from their checksum (`verify`, hashed
  on `threads` threads)."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except OSError:
    return None
  f = os.fdopen(fd, "rb")
  try:
    magic = cache_header.MAGIC
    head = f.read(len(magic) + 8)
    size = int.from_bytes(head[len(magic):], "little")
    if head[:len(magic)] != magic or size > 1 << 30 or not trust.trusted_entry(os.fstat(fd)):
      return f.close()
    meta = json.loads(f.read(size - len(head)))
    dtype = np.dtype(meta["dtype"])
    expected_bytes = size + meta["tokens"] * dtype.itemsize
    if (meta["format"] != cache_header.CACHE_FORMAT
        or os.fstat(fd).st_size != expected_bytes):
      return f.close()
    if verify and _pieces_hash(path, size, threads=threads) != meta["sha256"]:
      f.close()
      return "damaged"
    tokens = TokenFile(path, size, dtype, 0, meta["tokens"], f)
    if "bpe" in meta:
      tokenizer = BpeTokenizer.from_json(meta["bpe"])
    elif "randygpt_bpe" in meta:
      tokenizer = RandygptBpeTokenizer.from_record(meta["randygpt_bpe"])
    else:
      tokenizer = CharTokenizer(tuple(meta["chars"]))
  except (OSError, ValueError, KeyError, TypeError):
    return f.close()
  return tokenizer, tokens, meta


def _parts(files: list[Path], encoding: str, n_train: int, part: int) -> Iterator[str]:
  """The text of the training split (`part` 0: its first `n_train` characters) or of the
  validation split (`part` 1: the rest), in pieces."""
  def pieces():
    seen = 0
    for text in sources.text_chunks(files, encoding, "bpe"):
      head = text[:max(n_train - seen, 0)]
      seen += len(text)
      yield from ((i, t) for i, t in ((0, head), (1, text[len(head):])) if t)
  chosen = itertools.takewhile(lambda p: p[0] <= part, pieces())
  return (text for index, text in chosen if index == part)


def _write_tokens(out, tokenizer: BpeTokenizer, texts: Iterator[str]) -> int:
  """Writes the tokens of the text of `texts`, encoded a few megabytes at a time; their
  count."""
  count, batch, size = 0, [], 0
  for piece in itertools.chain(bpe.line_pieces(texts), [None]):
    if piece is not None:
      batch.append(piece)
      size += len(piece)
    if batch and (piece is None or size >= bpe.ENCODE_CHARS):
      ids = tokenizer.encode_pieces(batch)
      out.write(ids.tobytes())
      count, batch, size = count + len(ids), [], 0
  return count


def _write_bpe(out, files: list[Path], encoding: str, vocab_size: int) -> None:
  """A BPE cache: the tokenizer trained on the training split, then each split's tokens."""
  alphabet, n_chars = _scan(files, encoding, "bpe")
  n_train = windowing.train_length(n_chars)
  start = time.perf_counter()
  tokenizer = bpe.train(_parts(files, encoding, n_train, 0), "".join(alphabet.chars),
                        vocab_size, n_train)
  print(f"BPE tokenizer: {tokenizer.vocab_size} tokens trained on "
        f"{min(n_train, bpe.TRAIN_CHARS):,} of the training split's {n_train:,} characters "
        f"in {time.perf_counter() - start:.1f}s", flush=True)
  # Tokens are never more than characters: the header written last fits in this one's room.
  room = len(cache_header.header(tokenizer, n_chars, train_tokens=n_chars,
                                 text_chars=[n_chars] * 2))
  out.write(b" " * room)
  hashed = cache_header.Hashing(out, PIECE_BYTES)
  train_tokens = _write_tokens(hashed, tokenizer, _parts(files, encoding, n_train, 0))
  n_tokens = train_tokens + _write_tokens(hashed, tokenizer, _parts(files, encoding, n_train, 1))
  out.seek(0)
  out.write(cache_header.header(tokenizer, n_tokens, room, hashed.hexdigest(),
                                train_tokens=train_tokens,
                                text_chars=[n_train, n_chars - n_train]))


def _write_randygpt_bpe(out, files: list[Path], encoding: str,
                        tokenizer: RandygptBpeTokenizer) -> None:
  """A cache of randyGPT's BPE tokens of the text as randyGPT reads it, split as randyGPT
  splits them: the first 90% of the tokens train."""
  room = len(cache_header.header(tokenizer, 10**15, train_tokens=10**15,
                                 text_chars=[10**15] * 2))
  out.write(b" " * room)
  read = []  # The length of each piece of text read.
  n_tokens, hashed = 0, cache_header.Hashing(out, PIECE_BYTES)
  for ids in tokenizer.encode_pieces(_counted(
      sources.text_chunks(files, encoding, "randygpt"), read)):
    hashed.write(ids.tobytes())
    n_tokens += len(ids)
  train_tokens = windowing.train_length(n_tokens)
  lengths = np.array([len(s) for s in tokenizer.chars], np.int64)
  train_chars = _token_chars(out, room, train_tokens, lengths, tokenizer.dtype)
  n_chars = train_chars + _token_chars(out, None, n_tokens - train_tokens, lengths,
                                       tokenizer.dtype)
  if sum(read) > n_chars:
    print(f"⚠ {sum(read) - n_chars:,} characters of the text are not in the --bpe_vocab "
          "vocabulary: left out, as randyGPT leaves them out.", flush=True)
  out.seek(0)
  out.write(cache_header.header(tokenizer, n_tokens, room, hashed.hexdigest(),
                                train_tokens=train_tokens,
                                text_chars=[train_chars, n_chars - train_chars]))


def _counted(pieces: Iterator[str], lengths: list[int]) -> Iterator[str]:
  """`pieces`, each one's length appended to `lengths` as it passes."""
  for piece in pieces:
    lengths.append(len(piece))
    yield piece


def _token_chars(out, start: int | None, count: int, lengths: np.ndarray, dtype) -> int:
  """The characters that `count` tokens written to `out` stand for, read from `start` (or
  from where the last read ended)."""
  if start is not None:
    out.seek(start)
  chars = 0
  while count:
    ids = np.frombuffer(out.read(min(count, 1 << 24) * dtype.itemsize), dtype)
    chars, count = chars + int(lengths[ids].sum()), count - len(ids)
  return chars


def _write_chars(out, files: list[Path], encoding: str, tokenizer_name: str) -> bool:
  """Writes a character tokenizer's cache (its header, then its tokens) to `out`; whether the
  second reading of the text found the text of the first (its characters, its length)."""
  tokenizer, n_tokens = _scan(files, encoding, tokenizer_name)
  header = cache_header.header(tokenizer, n_tokens)
  out.write(header)
  hashed = cache_header.Hashing(out, PIECE_BYTES)
  try:
    for chunk in _encoded_chunks(files, encoding, tokenizer, tokenizer_name):
      hashed.write(chunk)
  except IndexError:  # A character the first pass did not see.
    return False
  complete = out.tell() - len(header) == n_tokens * tokenizer.dtype.itemsize
  out.seek(0)
  out.write(cache_header.header(tokenizer, n_tokens, len(header), hashed.hexdigest()))
  return complete


def build_cache(path: Path, files: list[Path], encoding: str, tokenizer_name: str,
                bpe_vocab_size: int = 0, vocab: RandygptBpeTokenizer | None = None) -> None:
  """Encodes the text into the cache file `path`: written under a temporary name and renamed
  when complete, so that a reader never trusts half a file and two runs building the same
  cache at once both succeed. The text is read more than once (e.g. its vocabulary, then its
  tokens): a text that changes in between is refused."""
  before = [_stamp(f) for f in files]
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w+b") as out:  # Read too: a randyGPT BPE split counts characters.
      complete = True
      if tokenizer_name == "bpe":
        _write_bpe(out, files, encoding, bpe_vocab_size)
      elif tokenizer_name == "randygpt-bpe":
        _write_randygpt_bpe(out, files, encoding, vocab)
      else:
        complete = _write_chars(out, files, encoding, tokenizer_name)
    if not complete or [_stamp(f) for f in files] != before:
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
                tokenizer: str = "chars", bpe_vocab_size: int = 0, bpe_vocab: str = "",
                sample_fallback: bool = True, hash_threads: int = 1) -> Corpus:
  """The tokens of the text --data names, from the token cache in `cache_dir` (built on
  first use; its files' contents hashed on `hash_threads` threads), and its split.
  `bpe_vocab` is randyGPT's vocab.json, for `tokenizer="randygpt-bpe"`."""
  vocab = _randygpt_vocab(bpe_vocab) if tokenizer == "randygpt-bpe" else None
  paths, description = sources.resolve_sources(data, url, sample_fallback)
  files = tuple({"path": str(p), "bytes": p.stat().st_size,
                 "hash": content_hash(p, threads=hash_threads)} for p in paths)
  name = f"{bpe.RECIPE}-{bpe_vocab_size}" if tokenizer == "bpe" else tokenizer
  if vocab:  # The vocabulary is part of the key: another vocab.json, another cache.
    name += "-" + hashlib.sha256(json.dumps(vocab.record()).encode()).hexdigest()
  path = cache_dir / f"{_cache_key(files, encoding, name)[:32]}.tokens"
  built_s = None
  if (opened := open_cache(path, threads=hash_threads)) in (None, "damaged"):
    if opened == "damaged":
      print(f"⚠ The token cache {path} differs from its checksum (damaged on disk): "
            "rebuilding it.", flush=True)
    start = time.perf_counter()
    print(f"Encoding {description} into the token cache...", flush=True)
    build_cache(path, paths, encoding, tokenizer, bpe_vocab_size, vocab)
    built_s = time.perf_counter() - start
    opened = open_cache(path, verify=False)  # Just written by this process.
  tok, tokens, meta = opened
  train_tokens = meta.get("train_tokens", windowing.train_length(len(tokens)))
  text_chars = tuple(meta.get("text_chars", (train_tokens, len(tokens) - train_tokens)))
  return Corpus(tok, tokens, description, path, built_s, files, train_tokens, text_chars)


def _randygpt_vocab(path: str) -> RandygptBpeTokenizer:
  if not path:
    raise UserError("--tokenizer=randygpt-bpe needs --bpe_vocab=vocab.json: the vocabulary "
                    "file randyGPT wrote with --bpe.")
  return RandygptBpeTokenizer.from_file(Path(path).expanduser())
