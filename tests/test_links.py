"""Every internal link of the README, docs/ and the notebooks leads somewhere: the file exists, a ``#fragment``
names one of its headings, no page links to itself, and a prose pointer such as 'README: Data schema' names a
section the README has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.py"))]
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```.*?^\s*```", flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text()))


def dead_links(path: Path) -> list[str]:
    dead = []
    for link in links(path):
        if re.match(r"^[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, fragment = link.partition("#")
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            dead.append(f"{link} (no such file)")
        elif target and dest == path.resolve() and not fragment:
            dead.append(f"{link} (the page links to itself)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            dead.append(f"{link} (no heading #{fragment} in {dest.name})")
    return dead


def test_the_checker_finds_what_it_looks_for(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n## A section: with `code`\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md) [ok](b.md#a-section-with-code) [self](a.md) [gone](c.md) [bad](b.md#nope) "
        "[web](https://x.org/y) ![img](pic.png)\n```bash\n[in code](nowhere.md)\n```\n"
    )
    assert dead_links(page) == [
        "a.md (the page links to itself)",
        "c.md (no such file)",
        "b.md#nope (no heading #nope in b.md)",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dead_internal_link(page):
    assert dead_links(page) == []


def test_prose_pointers_into_the_readme_name_its_sections():
    sections = {slug(s) for s in re.findall(r"^#{1,6}\s+(.+?)\s*$", (ROOT / "README.md").read_text(), flags=re.M)}
    sources = [*PAGES, *sorted((ROOT / "v3kit").rglob("*.py"))]
    pointers = []
    for path in sources:
        text = path.read_text()
        for name in re.findall(r"README(?:'s)?[:,]? \"([^\"]+)\"", text) + re.findall(r"\(README: ([^)]+)\)", text):
            pointers.append((path.relative_to(ROOT), name))
    assert [p for p in pointers if slug(p[1]) not in sections] == []
