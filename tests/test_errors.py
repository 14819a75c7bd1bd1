"""docs/errors.md and the code's error messages, kept in step in both directions.

The code's messages are read with `ast` from every .py file under randygpt/ (any depth):
the message of every call of `UserError(...)` (or of a class derived from it) and of
`_exit_with_error(...)`, of every absl validator (`flags.register_validator(name, checker,
message)` and `flags.register_multi_flags_validator(names, checker, message)`), and every
string that itself starts with `Error: ` (a message printed directly). A message is a sequence of
literal fragments and placeholders (an f-string's `{...}`, a variable, a `+` of them).

docs/errors.md documents each message once, as a code span that starts with `Error: `,
with `{name}` for each part that changes (a path, a number): e.g.
`Error: --data={path} does not exist.` absl writes `flag --NAME=VALUE: ` (or
`flags A=x, B=y: `) before a validator's message, and the CLI adds ABSL_ERROR_SUFFIX after
every error absl raises; the documented message keeps both.

A code message matches a documented one as a whole message: its literal fragments make up
the documented text from its start to its end, in order, each of its placeholders standing
for any text between them (a `{name}`, or words the code fills in).

Checked:
- every code message is documented: it matches a documented message;
- every documented message is in the code: its first words (the first sentence of its text
  before the first `{placeholder}`, after absl's prefix; when that text is under 12
  characters, of its longest literal fragment) occur in a string of the code, and it
  matches some code message;
- no other file in docs/ repeats a documented message.

No JAX import: this reads files only.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "randygpt"
ERRORS_MD = REPO / "docs" / "errors.md"

MESSAGE_CALLS = {"UserError", "_exit_with_error"}
VALIDATOR_CALLS = {"register_validator", "register_multi_flags_validator"}
PREFIX = "Error: "
MIN_FIRST_WORDS = 12  # Shorter literal starts ("Checkpoint ") say too little on their own.
PLACEHOLDER = re.compile(r"\{[^{}]*\}")
ABSL_PREFIX = re.compile(r"flags? [^:]*: ")  # absl's `flag --n_layer={value}: ` before a message.
# What the CLI adds after the text of an error absl raises (randygpt/runtime/cli.py's
# `f"{e} (--helpshort lists the flags.)"`: test_the_parsers_find_messages checks it is there).
ABSL_ERROR_SUFFIX = " (--helpshort lists the flags.)"
# A validator's message, as the CLI shows it: [ABSL, *message, ABSL_ERROR_SUFFIX].
ABSL = "<absl's flag prefix>"
DOC_MESSAGE = re.compile(r"`(Error: (?:[^`\\]|\\.)*)`")


def _parts(node) -> list:
  """The message `node` builds, as literal strings and None for each placeholder."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return [node.value]
  if isinstance(node, ast.JoinedStr):
    return [v.value if isinstance(v, ast.Constant) else None for v in node.values]
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    return _parts(node.left) + _parts(node.right)
  return [None]


def _merge(parts: list) -> list:
  """Adjacent literals joined, adjacent placeholders collapsed, empty literals dropped."""
  merged = []
  for part in parts:
    if part == "":
      continue
    if merged and _literal(part) and _literal(merged[-1]):
      merged[-1] += part
    elif not (merged and part is None and merged[-1] is None):
      merged.append(part)
  return merged


def _literal(part) -> bool:
  return isinstance(part, str) and part is not ABSL


def _name(func) -> str:
  return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def _trees() -> list[tuple[Path, ast.AST]]:
  return [(path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
          for path in sorted(PACKAGE.rglob("*.py"))]


def _message_calls(trees) -> set[str]:
  """UserError, _exit_with_error and every class derived from UserError, at any depth."""
  calls, grew = set(MESSAGE_CALLS), True
  while grew:
    grew = False
    for _, tree in trees:
      for node in ast.walk(tree):
        if (isinstance(node, ast.ClassDef) and node.name not in calls
            and any(_name(base) in calls for base in node.bases)):
          calls.add(node.name)
          grew = True
  return calls


def code_messages() -> list[tuple[str, list]]:
  """(where, parts) for every user-facing error message in randygpt/**/*.py."""
  found = []
  trees = _trees()
  message_calls = _message_calls(trees)
  for path, tree in trees:
    inside_fstrings = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                       for v in node.values}
    for node in ast.walk(tree):
      message = None
      if isinstance(node, ast.Call) and _name(node.func) in message_calls and node.args:
        message = node.args[0]
      elif isinstance(node, ast.Call) and _name(node.func) in VALIDATOR_CALLS:
        keywords = {k.arg: k.value for k in node.keywords}
        message = node.args[2] if len(node.args) > 2 else keywords.get("message")
      elif isinstance(node, (ast.Constant, ast.JoinedStr)) and id(node) not in inside_fstrings:
        parts = _parts(node)
        if parts and isinstance(parts[0], str) and parts[0].startswith(PREFIX):
          message = node
      if message is None:
        continue
      parts = _parts(message)
      if parts and isinstance(parts[0], str) and parts[0].startswith(PREFIX):
        parts[0] = parts[0][len(PREFIX):]
      parts = _merge(parts)
      if sum(len(p.strip()) for p in parts if p) < 4:
        continue  # E.g. `_exit_with_error(str(e))`: the text is another message's.
      if isinstance(node, ast.Call) and _name(node.func) in VALIDATOR_CALLS:
        parts = [ABSL, *parts, ABSL_ERROR_SUFFIX]
      found.append((f"{path.relative_to(REPO)}:{node.lineno}", _merge(parts)))
  return found


def code_literals() -> list[str]:
  """Every literal string fragment in randygpt/**/*.py."""
  literals = []
  for _, tree in _trees():
    for node in ast.walk(tree):
      if isinstance(node, (ast.Constant, ast.JoinedStr)):
        literals.extend(p for p in _parts(node) if p)
  return literals


def documented_messages() -> list[str]:
  """Every `Error: ...` code span in docs/errors.md, without `Error: ` (`\\|` unescaped)."""
  text = ERRORS_MD.read_text(encoding="utf-8")
  messages = [m.replace("\\|", "|")[len(PREFIX):] for m in DOC_MESSAGE.findall(text)]
  return [m for m in messages if m.strip()]


def _without_absl_prefix(doc: str) -> str:
  match = ABSL_PREFIX.match(doc)
  return doc[match.end():] if match else doc


def _pattern(parts: list) -> str:
  """The regular expression of a code message: its literals, absl's prefix where absl writes
  it, and any text for each placeholder."""
  return "".join(".*?" if p is None else ABSL_PREFIX.pattern if p is ABSL else re.escape(p)
                 for p in parts)


def _matches(parts: list, doc: str, whole: bool = True) -> bool:
  """Whether the code message `parts` reads as the documented message `doc`: the whole of
  it (with `whole=False`, a beginning of it)."""
  match = re.fullmatch if whole else re.match
  return match(_pattern(parts), doc, re.DOTALL) is not None


def _render(parts: list) -> str:
  return "".join("{...}" if p is None else p for p in parts)


def _first_words(doc: str) -> str:
  fragments = PLACEHOLDER.split(_without_absl_prefix(doc))
  first = fragments[0]
  if len(first.strip()) < MIN_FIRST_WORDS:
    first = max(fragments, key=lambda f: len(f.strip()))
  first = first.lstrip(" .,;:()")  # The end of a placeholder's sentence: "). Pass ..."
  end = first.find(". ", MIN_FIRST_WORDS)  # Up to the end of the first sentence.
  return first[:end + 1] if end >= 0 else first


def _missing_fragment(parts: list, docs: list[str]) -> str:
  """For a failure message: the first fragment of `parts` that no documented message has in
  its place, or that a documented message goes on after."""
  for i in range(len(parts), 0, -1):
    if any(_matches(parts[:i], doc, whole=False) for doc in docs):
      return repr(parts[i]) if i < len(parts) else "(a documented message goes on after it)"
  return repr(parts[0])


def undocumented(messages: list[tuple[str, list]], docs: list[str]) -> list[str]:
  """The code messages (where, parts) that no documented message matches, each with why."""
  return [f"{where}: {_render(parts)!r}\n    missing from {ERRORS_MD.relative_to(REPO)} (no "
          f"documented message has, in order, its part {_missing_fragment(parts, docs)})."
          for where, parts in messages if not any(_matches(parts, doc) for doc in docs)]


def not_in_the_code(docs: list[str], messages: list[tuple[str, list]],
                    literals: list[str]) -> list[str]:
  """The documented messages that the code does not print, each with why."""
  problems = []
  for doc in docs:
    words = _first_words(doc)
    if not any(words in literal for literal in literals):
      problems.append(f"`Error: {doc}`\n    its first words {words!r} are in no string "
                      "under randygpt/.")
    elif not any(_matches(parts, doc) for _, parts in messages):
      problems.append(f"`Error: {doc}`\n    matches no message the code raises (as a whole "
                      "message: its fragments in order, from start to end).")
  return problems


def test_the_parsers_find_messages():
  messages = code_messages()
  assert len(messages) >= 30, "found too few messages in randygpt/: is the AST walk broken?"
  assert len(documented_messages()) >= 30, (
      f"found too few `Error: ...` code spans in {ERRORS_MD.relative_to(REPO)}")
  # The CLI shows absl's errors as the validators' messages are matched: `{e}` and the suffix.
  assert any(parts == [None, ABSL_ERROR_SUFFIX] for _, parts in messages), (
      f"no message `{{absl's error}}{ABSL_ERROR_SUFFIX}` in randygpt/: update "
      "ABSL_ERROR_SUFFIX to what the CLI adds after absl's errors")


def test_every_code_message_is_documented():
  problems = undocumented(code_messages(), documented_messages())
  assert not problems, (
      "Error messages in the code that docs/errors.md does not document. Add a row for each "
      "(or correct the row that documents it), with the message as a code span "
      "`Error: ...` and {name} for each part that changes:\n" + "\n".join(problems))


def test_every_documented_message_is_in_the_code():
  problems = not_in_the_code(documented_messages(), code_messages(), code_literals())
  assert not problems, (
      f"Messages documented in {ERRORS_MD.relative_to(REPO)} that the code no longer prints. "
      "Correct each row to the code's current text, or delete it if the error is gone:\n"
      + "\n".join(problems))


def test_messages_are_documented_once():
  docs = documented_messages()
  repeated = sorted({m for m in docs if docs.count(m) > 1})
  assert not repeated, f"documented twice in {ERRORS_MD.relative_to(REPO)}: {repeated}"
  elsewhere = []
  for path in sorted((REPO / "docs").rglob("*.md")):
    if path != ERRORS_MD:
      elsewhere += [f"{path.relative_to(REPO)}: {m}"
                    for m in DOC_MESSAGE.findall(path.read_text(encoding="utf-8"))
                    if m.strip() != PREFIX.strip()]
  assert not elsewhere, ("error messages belong in docs/errors.md alone; link to it instead "
                         "of repeating them:\n" + "\n".join(elsewhere))


@pytest.mark.parametrize("parts, doc, expected", [
    (["--data=", None, " does not exist."], "--data={path} does not exist.", True),
    (["--data=", None, " does not exist."], "--data={path} is missing.", False),
    # Whole messages: a documented message that goes on, or stops short, is another one.
    (["--data=", None, " does not exist."], "--data={path} does not exist. Check it.", False),
    (["--data=", None, " does not exist. Check it."], "--data={path} does not exist.", False),
    (["Checkpoint ", None, " is corrupt"], "The checkpoint {path} is corrupt", False),
    # A placeholder stands for any text: a `{name}`, or words the code fills in.
    ([None, " (--helpshort lists the flags.)"], "{absl's message} (--helpshort lists the flags.)",
     True),
    (["Cannot read ", None, "."], "Cannot read --data={path}: {reason}.", True),
    # A validator's message, as absl and the CLI show it; another message is not wrapped so.
    ([ABSL, "--dropout must be below 1.", ABSL_ERROR_SUFFIX],
     "flag --dropout={value}: --dropout must be below 1. (--helpshort lists the flags.)", True),
    ([ABSL, "--dropout must be below 1.", ABSL_ERROR_SUFFIX],
     "--dropout must be below 1. (--helpshort lists the flags.)", False),
    (["--dropout must be below 1."],
     "flag --dropout={value}: --dropout must be below 1. (--helpshort lists the flags.)", False),
])
def test_matching(parts, doc, expected):
  assert _matches(parts, doc) == expected


def test_a_message_documented_by_its_beginning_alone_fails_both_checks():
  # A synthetic table: each code message has a row that only begins as it does.
  messages = [("a.py:1", ["Checkpoint ", None, " is corrupt: ", None, ". Delete it."]),
              ("a.py:2", ["--data=", None, " does not exist."])]
  docs = ["Checkpoint {path} is corrupt", "--data={path} does not exist. Check the path."]
  literals = ["Checkpoint ", " is corrupt: ", ". Delete it.", "--data=", " does not exist."]
  problems = undocumented(messages, docs)
  assert len(problems) == 2, problems
  assert "(a documented message goes on after it)" in problems[1], problems
  assert "its part ' is corrupt: '" in problems[0], problems
  assert len(not_in_the_code(docs, messages, literals)) == 2
  # Written as the whole messages, the rows pass.
  docs = ["Checkpoint {path} is corrupt: {reason}. Delete it.", "--data={path} does not exist."]
  assert not undocumented(messages, docs) and not not_in_the_code(docs, messages, literals)
