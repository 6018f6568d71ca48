"""The README and docs/ hold together: every relative link resolves, every #anchor names a heading.

Links are Markdown links and images, ``[text](target)`` / ``![alt](target)``, outside code. A target
is checked when it is relative (not ``http(s):``, ``mailto:``): the file or folder must exist relative
to the Markdown file that links it. A ``#fragment`` into a ``.md`` file (or a pure ``#fragment``, into
the linking file itself) must match one of that file's headings, slugged as GitHub does.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests import REPO_ROOT

ROOT = REPO_ROOT
README_MAX_BYTES = 20 * 1024

_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (fence lines become blank)."""
    lines, fenced = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fenced is None and match:
            fenced = match.group(1)
            lines.append("")
        elif fenced is not None:
            if line.strip().startswith(fenced):
                fenced = None
            lines.append("")
        else:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (but - and _), spaces -> -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of ``path`` (repeats get -1, -2, ...)."""
    seen: Counter[str] = Counter()
    found = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(path: Path) -> list[str]:
    """The targets of the Markdown links and images in ``path``, outside code."""
    prose = "\n".join(_prose_lines(path.read_text(encoding="utf-8")))
    prose = _INLINE_CODE.sub("", prose)
    return [match.group(1) for match in _LINK.finditer(prose)]


def broken_links(path: Path) -> list[str]:
    """One line per relative link of ``path`` whose file, folder or heading does not exist."""
    problems = []
    for target in links(path):
        if not target or _EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: {linked} does not exist")
            continue
        if fragment and linked.is_file() and linked.suffix == ".md":
            if fragment.lower() not in anchors(linked):
                problems.append(f"{target}: no heading in {linked.name} has the anchor #{fragment}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, f"broken links in {path.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_headings_are_named_by_topic_not_by_issue(path: Path) -> None:
    headings = [m.group(2) for line in _prose_lines(path.read_text(encoding="utf-8")) if (m := _HEADING.match(line))]
    by_issue = [h for h in headings if re.search(r"\bissues?\s*#?\d", h, re.I)]
    assert not by_issue, f"headings named after issues in {path.relative_to(ROOT)}: {by_issue}"


def test_readme_stays_short() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Scale-out: Docker, `k8s`\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#scale-out-docker-k8s) [ok](#top) [ok](docs/)\n"
        "![ok](docs/page.md) [web](https://example.com/x) [mail](mailto:a@b.c)\n"
        "`[in code](missing.md)`\n\n```sh\n[in a fence](missing.md)\n# not a heading\n```\n"
        "[gone](docs/missing.md) ![gone](img/none.png) [bad anchor](docs/page.md#nowhere) [here](#not-a-heading)\n"
    )
    problems = broken_links(tmp_path / "README.md")
    assert [p.split(":")[0] for p in problems] == [
        "docs/missing.md",
        "img/none.png",
        "docs/page.md#nowhere",
        "#not-a-heading",
    ]
