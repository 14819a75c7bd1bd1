"""Text in, token windows out: reading, known-dataset download, the tokenizer, splits, batches."""

import dataclasses
import hashlib
import importlib.resources
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from randygpt.errors import UserError

DEFAULT_DATA = "train.txt"
VAL_FRACTION = 0.1
RANDYGPT_SLOTS = ("<", ">")  # randyGPT's BOS and EOS tokens, ids 0 and 1.


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

  def missing(self, text: str) -> list[str]:
    """Characters of `text` the vocabulary cannot encode, in order of first appearance."""
    known = set(self.chars)
    return list(dict.fromkeys(c for c in text if c not in known))

  def encode(self, text: str) -> np.ndarray:
    # A character listed twice (randyGPT's `<` and `>`) takes its last id, as randyGPT's
    # encoder does: its BOS and EOS ids never come from the text.
    index = {c: i for i, c in enumerate(self.chars)}
    return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).tolist())

  def save(self, path: Path) -> None:
    path.write_text(json.dumps({"chars": list(self.chars)}, ensure_ascii=False), encoding="utf-8")

  @classmethod
  def load(cls, path: Path) -> "CharTokenizer":
    return cls(tuple(json.loads(path.read_text(encoding="utf-8"))["chars"]))


def as_randygpt_reads(text: str) -> str:
  """`text` as randyGPT reads train.txt: line by line (Rust's `lines()`: split at "\\n", a
  trailing "\\r" dropped), each line ending in "\\n"."""
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return "".join(line.removesuffix("\r") + "\n" for line in lines)


def tokenize(text: str, tokenizer: str) -> tuple[str, CharTokenizer]:
  """The text as the --tokenizer reads it, and its vocabulary."""
  if tokenizer == "randygpt":
    text = as_randygpt_reads(text)
    return text, CharTokenizer.randygpt(text)
  return text, CharTokenizer.from_text(text)


def fallback_text() -> str:
  return importlib.resources.files("randygpt").joinpath("fallback.txt").read_text(encoding="utf-8")


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
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


def read_text(path: Path, encoding: str = "utf-8") -> str:
  """The whole file as text, or a UserError that says what is wrong with it."""
  if path.is_dir():
    raise UserError(f"--data={path} is a directory; pass a text file.")
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise UserError(f"Cannot read --data={path}: {e.strerror}.") from None
  if looks_binary(raw[:65536]):
    raise UserError(f"--data={path} looks like a binary file (it contains NUL or control "
                    "bytes); pass a plain text file.")
  try:
    text = raw.decode(encoding)
  except UnicodeDecodeError as e:
    raise UserError(
        f"--data={path} is not valid {encoding} text (byte 0x{raw[e.start]:02x} at offset "
        f"{e.start}). Pass --data_encoding (e.g. --data_encoding=latin-1) or convert it: "
        f"iconv -f latin1 -t utf-8 {path} > converted.txt") from None
  except LookupError:
    raise UserError(f"Unknown --data_encoding={encoding}.") from None
  if not text.strip():
    raise UserError(f"--data={path} is empty{' (only whitespace)' if text else ''}; "
                    "it needs some text to learn from.")
  return text


def load_text(data: str, *, url: str = "", encoding: str = "utf-8") -> tuple[str, str]:
  """The training text and a description of where it came from.

  A missing file is downloaded when its name is a known dataset, replaced by the
  built-in sample when it is the default `train.txt`, and an error otherwise.
  """
  path = Path(data).expanduser()
  if not path.exists():
    known = KNOWN_DATASETS.get(path.name)
    if known:
      url = url or known.url
      print(f"Downloading {path.name} from {url} ...", flush=True)
      download(url, path, known)
    elif data == DEFAULT_DATA:
      print(f"⚠ {DEFAULT_DATA} not found: training on the small built-in sample text. "
            "It is for trying the program out; pass --data=PATH to train on your own text.",
            flush=True)
      return fallback_text(), "built-in sample"
    else:
      raise UserError(f"--data={data} does not exist.")
  return read_text(path, encoding), str(path)


def min_text_length(block_size: int) -> int:
  """Shortest text whose 90/10 split leaves at least one window of block_size+1 on each side."""
  return int(np.ceil((block_size + 1) / VAL_FRACTION))


def split(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The first 90% for training, the last 10% for validation."""
  if len(tokens) < min_text_length(block_size):
    raise UserError(
        f"The text is too short: {len(tokens):,} characters, but block_size={block_size} needs "
        f"at least {min_text_length(block_size):,} so that the 90/10 split leaves a window of "
        f"{block_size + 1} characters for validation. Use more text or a smaller --block_size.")
  n_train = int(len(tokens) * (1 - VAL_FRACTION))
  return tokens[:n_train], tokens[n_train:]


def window_starts(tokens: jax.Array, key: jax.Array, n: int, block_size: int) -> jax.Array:
  return jax.random.randint(key, (n,), 0, tokens.shape[0] - block_size)


def windows(tokens: jax.Array, starts_B: jax.Array, block_size: int):
  """The windows at `starts_B`: inputs and their next-character targets, each (B, T)."""
  windows_BxT1 = tokens[starts_B[:, None] + jnp.arange(block_size + 1)]
  return windows_BxT1[:, :-1], windows_BxT1[:, 1:]


def get_batch(tokens: jax.Array, key: jax.Array, batch_size: int, block_size: int):
  """`batch_size` random windows: inputs and their next-character targets, each (B, T)."""
  return windows(tokens, window_starts(tokens, key, batch_size, block_size), block_size)
