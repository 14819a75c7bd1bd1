"""The README, WORKSPACE.md and docs/: every relative link names a file of the repository, and
every #anchor a heading of the page it points at (GitHub's anchors)."""

import re
from pathlib import Path

from conftest import REPO

PAGES = [REPO / "README.md", REPO / "WORKSPACE.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str):
  """The lines outside fenced code blocks, and each line with its inline code spans removed."""
  fenced = False
  for line in text.splitlines():
    if FENCE.match(line):
      fenced = not fenced
    elif not fenced:
      yield re.sub(r"`[^`]*`", "", line)


def anchor(heading: str) -> str:
  """GitHub's anchor for a heading: link text kept, lowercase, punctuation dropped, spaces to -."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
  """Every anchor of a page: its headings' (a repeated heading gets -1, -2...), and <a id=...>."""
  found, seen = set(), {}
  fenced = False
  for line in page.read_text(encoding="utf-8").splitlines():
    if FENCE.match(line):
      fenced = not fenced
    elif not fenced and (heading := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
      base = anchor(heading.group(1))
      found.add(base if base not in seen else f"{base}-{seen[base]}")
      seen[base] = seen.get(base, 0) + 1
  found |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", page.read_text(encoding="utf-8")))
  return found


def broken_links(page: Path) -> list[str]:
  broken = []
  for line in prose_lines(page.read_text(encoding="utf-8")):
    for target in LINK.findall(line):
      if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked here.
        continue
      path, _, fragment = target.partition("#")
      linked = (page.parent / path).resolve() if path else page
      if not linked.exists() or REPO not in (linked, *linked.parents):
        broken.append(f"{page.relative_to(REPO)}: {target} (no such file in the repository)")
      elif fragment and (linked.suffix != ".md" or fragment not in anchors(linked)):
        broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
  return broken


def test_github_anchors_of_headings():
  assert anchor("The figures' runs") == "the-figures-runs"
  assert anchor("Against both PyTorch peers, by shape") == "against-both-pytorch-peers-by-shape"
  assert anchor("The rolling key/value cache") == "the-rolling-keyvalue-cache"
  assert anchor("`--resume` and the horizon") == "--resume-and-the-horizon"
  assert anchor("Seed-to-seed spread (2026-12-04)") == "seed-to-seed-spread-2026-12-04"


def test_a_broken_link_is_found(tmp_path, monkeypatch):
  monkeypatch.setattr("test_docs.REPO", tmp_path)
  (tmp_path / "a.md").write_text("# Top\n## Top\n[ok](a.md#top-1) [file](b.md) [anchor](#nope)\n"
                                 "`[code](missing.md)`\n```\n[fenced](missing.md)\n```\n")
  assert broken_links(tmp_path / "a.md") == ["a.md: b.md (no such file in the repository)",
                                             "a.md: #nope (no such heading)"]


def test_every_relative_link_and_anchor_resolves():
  broken = [problem for page in PAGES for problem in broken_links(page)]
  assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_and_the_developers_guide_stay_short():
  """A newcomer reads the README top to bottom, a developer WORKSPACE.md: 250 and 200 lines."""
  for page, most in (("README.md", 250), ("WORKSPACE.md", 200)):
    lines = (REPO / page).read_text(encoding="utf-8").count("\n")
    assert lines <= most, f"{page} has {lines} lines, over {most}: move reference to docs/"
