"""The text --data names: known datasets (downloaded and checked by SHA-256), files,
directories and globs, the built-in sample, and their text decoded in pieces, refusing
binary files and undecodable bytes."""

import codecs
import dataclasses
import glob
import hashlib
import importlib.resources
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from randygpt.data.randygpt_text import RandygptLines
from randygpt.errors import UserError

DEFAULT_DATA = "train.txt"
CHUNK_BYTES = 8 << 20  # Text read, decoded and encoded at a time.


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


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download(url: str, dest: Path, known: KnownDataset, timeout: float = 30.0) -> None:
  """Fetch `url` into `dest`, atomically, only if its size and SHA-256 match `known`; a
  response longer than `known.size` is stopped there."""
  try:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  except OSError as e:
    raise UserError(f"Cannot write the download {dest} ({e.strerror}). Put the file there "
                    "yourself, or pass --data=PATH to a text file.") from None
  tmp = Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
      # Never more than the known size (and one byte, to tell a longer file): a wrong URL
      # or server cannot fill the disk.
      while chunk := response.read(min(1 << 20, known.size + 1 - out.tell())):
        out.write(chunk)
      if out.tell() > known.size:
        raise UserError(f"Downloaded {url} is longer than the expected {known.size:,} bytes: "
                        f"stopped there. Nothing was saved; download it yourself to {dest} "
                        "or pass --data=PATH.")
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
