"""A token cache file's tokens, read with positioned reads."""

import os
from pathlib import Path

import numpy as np


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
