"""The RGPT file: its header, its size for a shape (and the shapes that fit another size),
and its tensors as randygpt parameter trees.

Every format has randyGPT v0.5's 24-byte header (magic, vocab_size, iter, step, best_loss)
and its weights in the same order (randyGPT's src/checkpoint.rs); they differ in what
follows the weights.
"""

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from randygpt import model
from randygpt.config import ModelConfig
from randygpt.errors import UserError

HEADER_BYTES = 24


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  written_by: str
  # What follows the weights: "interleaved" (each weight's m, then its v), "grouped" (every
  # m in the weights' order, then every v), or "" (nothing: no Adam moments).
  moments: str

  @property
  def bytes_per_param(self) -> int:
    return 12 if self.moments else 4  # The weight, and its two moments when kept; f32 each.


FORMATS = {f.name: f for f in (
    Format("RGPT0001", "randyGPT v0.5 to v0.7 (CPU)", "interleaved"),
    Format("RGPT0002", "randyGPT v0.8.0 (Metal)", ""),
    Format("RGPT0003", "randyGPT v0.8.5 and later", "grouped"))}
# Formats known and refused, with the reason.
REFUSED = {"RGPT0004": "randyGPT's mixture-of-experts model (v0.9.8), whose experts "
                       "randygpt's model does not have"}
MAGIC = b"RGPT0001"  # The first format, for writers of test files.


def tensor_shapes(model_config: ModelConfig) -> list[tuple[int, int]]:
  """randyGPT's weight matrices in file order, each [n_out, n_in]."""
  v, e, block = model_config.vocab_size, model_config.n_embd, model_config.block_size
  layer = [(e, e)] * 4 + [(4 * e, e), (e, 4 * e)]  # wq, wk, wv, wo, fc1, fc2.
  return [(v, e), (block, e), (v, e)] + layer * model_config.n_layer


def _shape_flags(n_embd: int, n_layer: int, block_size: int) -> str:
  return f"--n_embd={n_embd} --n_layer={n_layer} --block_size={block_size}"


def shapes_that_fit(count: int, vocab_size: int, like: ModelConfig, limit: int = 5) -> list[tuple]:
  """(n_embd, n_layer, block_size) with exactly `count` parameters, for block sizes that are
  powers of two (or `like`'s) and up to 64 layers; those closest to `like` first."""
  found = []
  for block in sorted({like.block_size, *(2**i for i in range(3, 13))}):
    for layer in range(1, 65):
      # Solve 12*layer*e^2 + (2*vocab_size + block)*e = count for a whole e.
      b = 2 * vocab_size + block
      e = round((math.sqrt(b * b + 48 * layer * count) - b) / (24 * layer))
      shape = ModelConfig(vocab_size=vocab_size, n_embd=e, n_layer=layer, block_size=block)
      if e > 0 and model.n_params(shape) == count:
        found.append((e, layer, block))
  given = (like.n_embd, like.n_layer, like.block_size)
  return sorted(found, key=lambda s: (sum(a != b for a, b in zip(s, given)), s))[:limit]


def read_header(path: Path) -> np.void:
  """The 24-byte header as a NumPy record (magic, vocab_size, iter, step, best_loss) of a
  file in one of FORMATS."""
  try:
    with open(path, "rb") as f:
      raw = f.read(HEADER_BYTES)
  except OSError as e:
    raise UserError(f"Cannot read {path}: {e.strerror}.") from None
  magic = raw[:8].decode("latin-1")
  if magic in REFUSED:
    raise UserError(f"{path} is an {magic} checkpoint, {REFUSED[magic]}: only "
                    f"{', '.join(FORMATS)} checkpoints can be imported.")
  if magic not in FORMATS and not (len(raw) < 8 and any(m.startswith(magic) for m in FORMATS)):
    raise UserError(f"Bad magic bytes in checkpoint {path} (expected {' or '.join(FORMATS)}, "
                    f"found {raw[:8]!r}): not a randyGPT checkpoint that can be imported.")
  if len(raw) < HEADER_BYTES:
    raise UserError(f"{path} is truncated: {len(raw)} bytes, less than the "
                    f"{HEADER_BYTES}-byte header.")
  header_dtype = np.dtype([("magic", "S8"), ("vocab_size", "<u4"), ("iter", "<u4"),
                           ("step", "<u4"), ("best_loss", "<f4")])
  return np.frombuffer(raw, dtype=header_dtype)[0]


def file_format(header: np.void) -> Format:
  return FORMATS[bytes(header["magic"]).decode()]


def check_size(path: Path, model_config: ModelConfig, fmt: Format = FORMATS["RGPT0001"]) -> None:
  """Refuses a file whose size is not that of `model_config`'s shape in format `fmt`, naming
  shapes that fit."""
  c = model_config
  size = path.stat().st_size
  expected = HEADER_BYTES + fmt.bytes_per_param * model.n_params(c)
  if size == expected:
    return
  shape = f"{_shape_flags(c.n_embd, c.n_layer, c.block_size)} (vocab_size {c.vocab_size})"
  count, rest = divmod(size - HEADER_BYTES, fmt.bytes_per_param)
  fits = [] if rest else shapes_that_fit(count, c.vocab_size, c)
  if fits:
    maybe_cut = " (or the file is truncated)" if size < expected else ""
    raise UserError(
        f"{path} has {size:,} bytes, but the shape {shape} needs {expected:,}{maybe_cut}. "
        f"Shapes that fit: {'; '.join(_shape_flags(*s) for s in fits)}. Pass the shape "
        "randyGPT trained with (and an --n_head that divides --n_embd).")
  if size < expected:
    raise UserError(f"{path} is truncated: {size:,} bytes, but a checkpoint of the shape "
                    f"{shape} has {expected:,}.")
  raise UserError(f"{path} has {size:,} bytes, more than the {expected:,} of the shape {shape}, "
                  f"and no other shape fits: it is not a whole {fmt.name} checkpoint.")


def to_params(arrays: list, n_layer: int) -> dict:
  """randygpt's parameter tree from randyGPT's matrices in file order. randyGPT applies
  W[n_out, n_in] as W·x and randygpt as x @ W, so every projection is transposed; wq, wk
  and wv become wqkv's q, k and v columns (head h at columns h*head_dim onwards of each)."""
  it = iter(arrays)
  wte, wpe, lm_head = next(it), next(it), next(it)
  blocks = []
  for _ in range(n_layer):
    wq, wk, wv, wo, fc1, fc2 = (next(it) for _ in range(6))
    blocks.append({"attn": {"wqkv": np.concatenate([wq.T, wk.T, wv.T], axis=1), "wo": wo.T},
                   "mlp": {"w1": fc1.T, "w2": fc2.T}})
  stacked = jax.tree.map(lambda *layers: np.stack(layers), *blocks)  # As model.init_params.
  return {"wte": wte, "wpe": wpe, "lm_head": lm_head.T, "blocks": stacked}


def read_tensors(path: Path, model_config: ModelConfig,
                 fmt: Format = FORMATS["RGPT0001"]) -> tuple[dict, dict | None, dict | None]:
  """The weights and the Adam moments m and v of a size-checked file, each as a randygpt
  parameter tree of NumPy arrays (the moments None where the format has none)."""
  shapes = tensor_shapes(model_config)
  n = len(shapes)
  in_file = shapes * (3 if fmt.moments else 1)  # Every moment has its weight's shape.
  if fmt.moments == "interleaved":
    in_file = shapes + [s for s in shapes for _ in range(2)]
  flat = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
  pieces = np.split(flat, np.cumsum([r * c for r, c in in_file])[:-1])
  arrays = [p.reshape(s) for p, s in zip(pieces, in_file)]
  layouts = {"interleaved": (arrays[n::2], arrays[n + 1::2]),
             "grouped": (arrays[n:2 * n], arrays[2 * n:]), "": (None, None)}
  return tuple(None if a is None else to_params(a, model_config.n_layer)
               for a in (arrays[:n], *layouts[fmt.moments]))
