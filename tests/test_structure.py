"""The codebase's shape, as WORKSPACE.md states it: the research core imports no machinery,
no test hook lives in the code, and every module stays small enough to read in one sitting."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "randygpt"
# The research core: pure functions over pytrees and what they need. It may import only
# itself (and outside libraries); runtime/, checkpoint.py, the trainer and the entry points
# import it, never the reverse.
CORE = ("config", "errors", "model", "optim", "train", "sharding", "evaluate", "generate",
        "data")
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
  return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def is_core(name: str) -> bool:
  parts = name.split(".")
  return parts[0] == "randygpt" and len(parts) > 1 and parts[1] in CORE


def randygpt_imports(path: Path) -> set[str]:
  """The randygpt modules `path` imports, anywhere in it (`from randygpt import x` counts
  as importing randygpt.x)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
  return {name for name in found if name.startswith("randygpt.") or name == "randygpt"}


def imported_machinery(path: Path) -> set[str]:
  """What `path` imports from randygpt that is not the core (a name imported from a core
  module, `randygpt.config.RunConfig`, is in the core)."""
  return {name for name in randygpt_imports(path) if name != "randygpt" and not is_core(name)}


CORE_FILES = sorted(p for p in PACKAGE.rglob("*.py") if is_core(module_name(p)))


def test_the_core_is_found():
  assert {module_name(p) for p in CORE_FILES} >= {
      "randygpt.model", "randygpt.train", "randygpt.evaluate", "randygpt.data.windowing"}


@pytest.mark.parametrize("path", CORE_FILES, ids=module_name)
def test_the_core_imports_no_machinery(path):
  assert imported_machinery(path) == set()


def test_the_scan_sees_a_machinery_import(tmp_path):
  """The scan itself can fail: an import of runtime or checkpoint, top-level or inside a
  function, is found."""
  path = tmp_path / "m.py"
  path.write_text("import jax\nfrom randygpt import model, checkpoint\n"
                  "def f():\n  from randygpt.runtime import devices\n")
  assert imported_machinery(path) == {"randygpt.checkpoint", "randygpt.runtime",
                                      "randygpt.runtime.devices"}


def test_no_test_hook_in_the_code():
  """Tests inject failures through arguments (a `place`, an `executor`), never a global."""
  for path in PACKAGE.rglob("*.py"):
    names = {node.id for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Name)}
    assert not names & {"SEAM", "Seam"}, path


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_modules_are_small(path):
  assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_MODULE_LINES
