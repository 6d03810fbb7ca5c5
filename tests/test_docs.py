"""The documentation stands alone and holds together: every relative link in README.md,
CHANGELOG.md, docs/*.md and deploy/README.md leads to a file of the repository, and every
#anchor to a heading of the page it names (GitHub's anchors); every page of docs/ is
reachable from the README; the README stays short (a newcomer's first page)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "deploy" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to -)."""
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = re.match(r"^#{1,6} (.*)$", line)
        if m and not fenced:
            text = re.sub(r"[`*]", "", m.group(1)).strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_of_a_page_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):           # http:, https:, mailto: — not ours to check
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        outside = ROOT.resolve() not in where.parents and where != ROOT.resolve()
        missing = not where.exists() or outside
        if missing or (anchor and where.suffix == ".md" and anchor not in anchors(where)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that lead nowhere: {broken}"


def test_every_docs_page_is_reachable_from_the_readme_and_the_readme_is_short():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme)}
    unreached = [p.name for p in (ROOT / "docs").glob("*.md") if p.name not in linked]
    assert not unreached, f"docs pages the README does not link: {unreached}"
    assert len(readme.splitlines()) <= 250
