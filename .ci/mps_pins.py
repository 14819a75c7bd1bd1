"""Checks requirements-mps.txt from Linux, as far as Linux can: its lines, markers stripped,
resolve for macOS on Apple Silicon with Python 3.12 (pip evaluates markers against the running
interpreter, not --platform, hence the stripping), and the pins meet what jax-mps's own
metadata requires (Requires-Python, Requires-Dist). pip resolves from the packages' metadata
alone (`--dry-run`); nothing is installed.

  python .ci/mps_pins.py [REQUIREMENTS]   # exit status 0 when both hold
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PLATFORM, PYTHON = "macosx_14_0_arm64", "3.12"


def stripped_lines(path: Path) -> list[str]:
  """The file's requirements, without comments or environment markers."""
  lines = (re.split(r"[;#]", line, maxsplit=1)[0].strip()
           for line in path.read_text().splitlines())
  return [line for line in lines if line]


def meets(pinned: Requirement | None, needed: Requirement) -> bool:
  """Whether the file's line `pinned` (==X, or a lower bound >=X) gives a version that
  `needed` admits: every version the line names must be."""
  return pinned is not None and all(Version(s.version) in needed.specifier
                                    for s in pinned.specifier)


def resolve(lines: list[str]) -> dict:
  """pip's resolution of `lines` for macOS arm64 and Python 3.12: {name: metadata}."""
  with tempfile.TemporaryDirectory() as scratch:
    requirements, report = Path(scratch) / "requirements.txt", Path(scratch) / "report.json"
    requirements.write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                    "--ignore-installed", "--only-binary=:all:", f"--platform={PLATFORM}",
                    f"--python-version={PYTHON}", f"--target={scratch}/never",
                    f"--report={report}", "-r", str(requirements)], check=True)
    return {item["metadata"]["name"].lower(): item["metadata"]
            for item in json.loads(report.read_text())["install"]}


def main(path: Path) -> int:
  lines = stripped_lines(path)
  pins = {r.name.lower(): r for r in map(Requirement, lines)}
  resolved = resolve(lines)
  plugin = resolved["jax-mps"]
  problems = []
  if Version(PYTHON) not in Requirement(f"python{plugin['requires_python']}").specifier:
    problems.append(f"jax-mps needs Python {plugin['requires_python']}")
  for needed in map(Requirement, plugin.get("requires_dist", [])):
    pinned = pins.get(needed.name.lower())
    if needed.marker is None and not meets(pinned, needed):
      problems.append(f"jax-mps {plugin['version']} needs {needed}; the file pins {pinned}")
  for problem in problems:
    print(f"ci: {path.name}: {problem}", file=sys.stderr)
  versions = ", ".join(f"{n} {resolved[n]['version']}" for n in ("jax-mps", "jax", "jaxlib"))
  print(f"ci: {path.name} resolves for {PLATFORM}, Python {PYTHON}: {versions}; jax-mps "
        f"requires {', '.join(plugin.get('requires_dist', []))} (Python "
        f"{plugin['requires_python']}): {'MISMATCH' if problems else 'met'}", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "requirements-mps.txt")))
