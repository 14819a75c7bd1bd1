"""randyGPT compatibility: how randyGPT (Rust) reads train.txt, and its BOS and EOS slots.

`--tokenizer=randygpt` and `import_bin` read a text as randyGPT did, so that an imported
checkpoint's vocabulary and windows are randyGPT's.
"""

RANDYGPT_SLOTS = ("<", ">")  # randyGPT's BOS and EOS tokens, ids 0 and 1.


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
