"""Text in, token windows out: the sources named by --data, the tokenizer, the token cache,
the 90/10 split, and the windows of a (seed, step).

A text of any size is read in chunks, encoded with NumPy into the smallest unsigned type
that holds its vocabulary and written once to a token cache keyed by its content; runs
read each step's windows from that file, so memory does not grow with the text
(docs/data.md; docs/measurements.md, "Data").
"""

import codecs
import concurrent.futures
import dataclasses
import glob
import hashlib
import importlib.resources
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from randygpt.errors import UserError
from randygpt.runtime import exported

DEFAULT_DATA = "train.txt"
VAL_FRACTION = 0.1
RANDYGPT_SLOTS = ("<", ">")  # randyGPT's BOS and EOS tokens, ids 0 and 1.
CHUNK_BYTES = 8 << 20  # Text read, decoded and encoded at a time.
CACHE_FORMAT = "randygpt-tokens-1"
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class KnownDataset:
  url: str
  sha256: str
  size: int


# Downloaded on first use when a --data path with this file name is missing.
KNOWN_DATASETS = {
    "tinyshakespeare.txt": KnownDataset(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394),
}


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
    """The smallest unsigned type that holds every token id."""
    for dtype in (np.uint8, np.uint16):
      if self.vocab_size <= np.iinfo(dtype).max + 1:
        return np.dtype(dtype)
    return np.dtype(np.uint32)

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


class RandygptLines:
  """randyGPT's reading of train.txt (Rust's `lines()`: split at "\\n", a trailing "\\r"
  dropped, each line ending in "\\n"), applied to a text fed in pieces."""

  def __init__(self):
    self._carry = ""  # A "\r" at the end of a piece, until the next shows what follows it.
    self._last = ""

  def feed(self, text: str) -> str:
    text = self._carry + text
    self._carry = "\r" if text.endswith("\r") else ""
    text = text[:len(text) - len(self._carry)].replace("\r\n", "\n")
    self._last = text[-1:] or self._last
    return text

  def end(self) -> str:
    """What the text's end adds: its last line's newline when it has none (a last line
    that ended in "\r" has none)."""
    return "" if not self._carry and self._last in ("\n", "") else "\n"


def as_randygpt_reads(text: str) -> str:
  """`text` as randyGPT reads train.txt."""
  lines = RandygptLines()
  return lines.feed(text) + lines.end()


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download(url: str, dest: Path, known: KnownDataset, timeout: float = 30.0) -> None:
  """Fetch `url` into `dest`, atomically, only if its size and SHA-256 match `known`."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  tmp = Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
      while chunk := response.read(1 << 20):
        out.write(chunk)
    size, digest = tmp.stat().st_size, _sha256(tmp)
    if size != known.size or digest != known.sha256:
      raise UserError(
          f"Downloaded {url} does not match the expected file ({size:,} bytes, SHA-256 "
          f"{digest[:12]}..., expected {known.size:,} bytes, {known.sha256[:12]}...). "
          f"Nothing was saved; download it yourself to {dest} or pass --data=PATH.")
    tmp.replace(dest)
  except (urllib.error.URLError, OSError) as e:
    raise UserError(f"Could not download {dest.name} from {url} ({getattr(e, 'reason', e)}). "
                    f"Put the file at {dest}, or pass --data=PATH to a text file.") from None
  finally:
    tmp.unlink(missing_ok=True)


# Control bytes that text uses: tab, newlines, vertical tab, form feed, escape.
TEXT_CONTROL_BYTES = frozenset(b"\t\n\v\f\r\x1b")
BINARY_CONTROL_FRACTION = 0.01


def looks_binary(raw: bytes) -> bool:
  """NUL bytes, or more control bytes than text has (text in any 8-bit encoding has few)."""
  controls = sum(b < 0x20 and b not in TEXT_CONTROL_BYTES for b in raw)
  return b"\0" in raw or controls > BINARY_CONTROL_FRACTION * len(raw)


def _fallback_path() -> Path:
  return Path(str(importlib.resources.files("randygpt").joinpath("fallback.txt")))


def _expand(part: str, url: str = "") -> list[Path]:
  """One entry of --data: a file, a directory's regular files, or a glob's, names in byte
  order; a missing known dataset is downloaded."""
  path = Path(part).expanduser()
  if path.is_dir():
    files = sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: os.fsencode(p.name))
    if not files:
      raise UserError(f"--data={part} is a directory with no files in it; pass text files.")
    return files
  if not path.exists() and glob.has_magic(part):
    files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(part)), key=os.fsencode)]
    if not any(p.is_file() for p in files):
      raise UserError(f"--data={part} matches no files.")
    return [p for p in files if p.is_file()]
  if not path.exists() and (known := KNOWN_DATASETS.get(path.name)):
    print(f"Downloading {path.name} from {url or known.url} ...", flush=True)
    download(url or known.url, path, known)
  if not path.exists():
    raise UserError(f"--data={part} does not exist.")
  return [path]


def resolve_sources(data: str, url: str = "", sample_fallback: bool = True):
  """The files --data names, in order, and how the header describes them. A missing
  default train.txt is the built-in sample (with `sample_fallback`); several entries are
  separated by commas."""
  if data == DEFAULT_DATA and not Path(data).exists() and sample_fallback:
    print(f"⚠ {DEFAULT_DATA} not found: training on the small built-in sample text. "
          "It is for trying the program out; pass --data=PATH to train on your own text.",
          flush=True)
    return [_fallback_path()], "built-in sample"
  parts = [data] if Path(data).expanduser().exists() else [p for p in data.split(",") if p]
  files = [f for part in parts for f in _expand(part, url)]
  return files, str(files[0]) if len(files) == 1 else f"{data} ({len(files)} files)"


def _decoded_chunks(path: Path, encoding: str) -> Iterator[str]:
  """The file's text in pieces of about CHUNK_BYTES, or a UserError naming what is wrong."""
  try:
    decoder = codecs.getincrementaldecoder(encoding)()
  except LookupError:
    raise UserError(f"Unknown --data_encoding={encoding}.") from None
  offset = 0
  try:
    with open(path, "rb") as f:
      while True:
        raw = f.read(CHUNK_BYTES)
        if offset == 0 and looks_binary(raw[:65536]):
          raise UserError(f"--data={path} looks like a binary file (it contains NUL or "
                          "control bytes); pass a plain text file.")
        try:
          yield decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
          at = offset + e.start - (len(e.object) - len(raw))
          raise UserError(
              f"--data={path} is not valid {encoding} text (byte 0x{e.object[e.start]:02x} at "
              f"offset {at}). Pass --data_encoding (e.g. --data_encoding=latin-1) or convert "
              f"it: iconv -f latin1 -t utf-8 {path} > converted.txt") from None
        if not raw:
          return
        offset += len(raw)
  except OSError as e:
    raise UserError(f"Cannot read --data={path}: {e.strerror}.") from None


def text_chunks(files: list[Path], encoding: str, tokenizer: str) -> Iterator[str]:
  """The training text of `files`, joined in order, as the tokenizer reads it, in pieces."""
  lines = RandygptLines() if tokenizer == "randygpt" else None
  for path in files:
    for text in _decoded_chunks(path, encoding):
      yield lines.feed(text) if lines else text
  if lines:
    yield lines.end()


class TokenFile:
  """Tokens `first` to `first + length` of a token cache file. Windows are read from it with
  positioned reads (`os.pread`) rather than through a memory map: a map keeps every page it
  has touched resident (the kernel maps whole folios of up to 2 MB per touch), so its memory
  would grow with the text; the kernel's page cache serves the reads either way."""

  def __init__(self, path: Path, offset: int, dtype: np.dtype, first: int, length: int,
               file=None):
    self.path, self.offset, self.dtype = path, offset, np.dtype(dtype)
    self.first, self.length = first, length
    self._file = file or open(path, "rb")  # Shared by slices; closed with the last.

  def __len__(self) -> int:
    return self.length

  @property
  def nbytes(self) -> int:
    return self.length * self.dtype.itemsize

  def __getitem__(self, index: slice) -> "TokenFile":
    start, stop, step = index.indices(self.length)
    if step != 1:
      raise ValueError("TokenFile slices are contiguous")
    return TokenFile(self.path, self.offset, self.dtype, self.first + start,
                     max(stop - start, 0), self._file)

  def windows(self, starts_B: np.ndarray, width: int) -> np.ndarray:
    """The `width` tokens from each start, (B, width)."""
    size = self.dtype.itemsize
    position = self.offset + (self.first + np.asarray(starts_B, np.int64)) * size
    raw = b"".join(os.pread(self._file.fileno(), width * size, int(p)) for p in position)
    return np.frombuffer(raw, self.dtype).reshape(len(position), width)

  def __array__(self, dtype=None, copy=None):
    """All the tokens, as a read-only memory map (for small texts and tests)."""
    tokens = np.memmap(self.path, self.dtype, mode="r", shape=(self.length,),
                       offset=self.offset + self.first * self.dtype.itemsize)
    return tokens if dtype is None else tokens.astype(dtype)


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
        while left > 0 and (chunk := f.read(min(CHUNK_BYTES, left))):
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
  for text in text_chunks(files, encoding, tokenizer):
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
  for text in text_chunks(files, encoding, tokenizer_name):
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
  cache at once both succeed."""
  tokenizer, n_tokens = _scan(files, encoding, tokenizer_name)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as out:
      out.write(_header(tokenizer, n_tokens))
      for chunk in _encoded_chunks(files, encoding, tokenizer, tokenizer_name):
        out.write(chunk)
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f"Could not write the token cache {path} ({e.strerror}). Free some disk "
                    "space, or set RANDYGPT_CACHE to a directory on another disk.") from None
  finally:
    Path(tmp).unlink(missing_ok=True)


def load_corpus(data: str, cache_dir: Path, *, url: str = "", encoding: str = "utf-8",
                tokenizer: str = "chars", sample_fallback: bool = True) -> Corpus:
  """The tokens of the text --data names, from the token cache in `cache_dir` (built on
  first use)."""
  paths, description = resolve_sources(data, url, sample_fallback)
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


def min_text_length(block_size: int) -> int:
  """Shortest text whose 90/10 split leaves at least one window of block_size+1 on each side."""
  return int(np.ceil((block_size + 1) / VAL_FRACTION))


def split(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The first 90% for training, the last 10% for validation (views, not copies)."""
  if len(tokens) < min_text_length(block_size):
    raise UserError(
        f"The text is too short: {len(tokens):,} characters, but block_size={block_size} needs "
        f"at least {min_text_length(block_size):,} so that the 90/10 split leaves a window of "
        f"{block_size + 1} characters for validation. Use more text or a smaller --block_size.")
  n_train = int(len(tokens) * (1 - VAL_FRACTION))
  return tokens[:n_train], tokens[n_train:]


def _draw(key: jax.Array, n: int, high: int) -> jax.Array:
  """`n` uniform draws from [0, high) as JAX makes them: `randint` where int32 holds `high`,
  else two 32-bit words each (which `_starts` joins)."""
  if high <= _INT32_MAX:
    return jax.random.randint(key, (n,), 0, high)
  return jax.random.bits(key, (2, n), jnp.uint32)


def _starts(drawn, high: int) -> np.ndarray:
  drawn = np.asarray(drawn)
  if high <= _INT32_MAX:
    return drawn.astype(np.int64)
  words = drawn.astype(np.uint64)
  joined = words[..., 0, :] << np.uint64(32) | words[..., 1, :]
  return (joined % np.uint64(high)).astype(np.int64)


def window_starts(key: jax.Array, n: int, n_tokens: int, block_size: int) -> np.ndarray:
  """`n` window starts drawn uniformly from the text's n_tokens - block_size positions."""
  high = n_tokens - block_size
  return _starts(_draw(key, n, high), high)


def windows(tokens, starts_B: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The windows at `starts_B`, read from `tokens` (a TokenFile or any array): inputs and
  their next-character targets, each (B, T) int32."""
  if isinstance(tokens, TokenFile):
    windows_BxT1 = tokens.windows(starts_B, block_size + 1)
  else:
    windows_BxT1 = tokens[starts_B[:, None] + np.arange(block_size + 1)]
  windows_BxT1 = np.asarray(windows_BxT1, np.int32)
  return windows_BxT1[:, :-1], windows_BxT1[:, 1:]


def get_batch(tokens, key: jax.Array, batch_size: int, block_size: int):
  """`batch_size` random windows of `tokens` for `key`: inputs and targets, each (B, T)."""
  return windows(tokens, window_starts(key, batch_size, len(tokens), block_size), block_size)


class WindowSampler:
  """The training windows of each step: their starts are a pure function of (key, step),
  drawn `steps_ahead` steps at a time in one JAX call, and gathered on the host."""

  def __init__(self, tokens, key: jax.Array, batch_size: int, block_size: int,
               steps_ahead: int = 64):
    self.tokens, self.block_size, self.steps_ahead = tokens, block_size, steps_ahead
    self._high = len(tokens) - block_size
    draw_one = lambda step: _draw(jax.random.fold_in(key, step), batch_size, self._high)
    self._draw_many = jax.jit(jax.vmap(draw_one))
    self._compiled = None  # Compiled at the first draw.
    self._first, self._starts = None, None

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    first = step - step % self.steps_ahead
    if first != self._first:
      steps = np.arange(first, first + self.steps_ahead, dtype=np.uint32)
      if self._compiled is None:
        self._compiled = exported.compile_kept(self._draw_many, steps)
      self._first, self._starts = first, _starts(self._compiled(steps), self._high)
    return windows(self.tokens, self._starts[step - first], self.block_size)
