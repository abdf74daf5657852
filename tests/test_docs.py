"""The README stays a front page and every relative link in it and in docs/ leads to a file."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), inline links only
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _links(page: Path) -> list[str]:
    """The relative link targets of ``page`` (outside code blocks), without their ``#anchor``."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    targets = (target.split("#", 1)[0] for target in LINK.findall(text))
    return [target for target in targets if target and not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_every_relative_link_points_to_a_file():
    broken = [f"{page.relative_to(REPO)}: {target}" for page in PAGES for target in _links(page)
              if not (page.parent / target).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_doc_is_linked_from_the_readme():
    linked = {(REPO / target).resolve() for target in _links(REPO / "README.md")}
    unlinked = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, f"docs/ pages the README does not link: {unlinked}"


def test_the_readme_stays_short():
    lines = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"README.md has {lines} lines; the manual belongs in docs/"
