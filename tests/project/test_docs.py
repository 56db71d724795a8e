"""The docs a newcomer reads: a short README that opens with the two commands, and links
and file paths in README.md and docs/*.md that lead somewhere real."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import ROOT_DIR

README = ROOT_DIR / "README.md"
DOCS = sorted((ROOT_DIR / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 8192

# Top-level folders of the repository: a `code span` starting with one of them is a path.
REPO_FOLDERS = (
    ".ci",
    "admin",
    "analysis",
    "bench",
    "devtools",
    "docs",
    "k8s",
    "ops",
    "service",
    "shared",
    "sidecar",
    "tests",
    "worker",
)

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?$")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(page: Path) -> str:
    """The page without its fenced code blocks: examples there are not links or claims."""
    return _FENCE.sub("", page.read_text())


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT_DIR))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_prose(page)):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links(page: Path) -> Iterator[str]:
    for target in _LINK.findall(_prose(page)):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
            yield target


def _repo_paths(page: Path) -> Iterator[str]:
    for span in _CODE_SPAN.findall(_prose(page)):
        if "/" in span and _PATH.match(span) and span.split("/")[0] in REPO_FOLDERS:
            yield span.rstrip("/")


def test_the_readme_is_short_enough_to_read_in_two_minutes() -> None:
    assert len(README.read_bytes()) <= README_MAX_BYTES


def test_the_readme_opens_with_the_two_commands_for_a_fresh_machine() -> None:
    lines = [line.strip() for line in README.read_text().splitlines() if line.strip()]
    commands = [line.split("#")[0].strip() for line in lines[1:3]]
    assert lines[0].startswith("# ")
    assert commands == ["make run", "make test"]


def _leads_somewhere(page: Path, target: str) -> bool:
    file_part, _, anchor = target.partition("#")
    linked = (page.parent / file_part).resolve() if file_part else page
    if not linked.exists():
        return False
    return not anchor or linked.suffix != ".md" or anchor in _anchors(linked)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    broken = [target for target in _relative_links(page) if not _leads_somewhere(page, target)]
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_repository_path_named_exists(page: Path) -> None:
    missing = [path for path in _repo_paths(page) if not (ROOT_DIR / path).exists()]
    assert missing == []


def test_the_checks_see_a_broken_link_a_missing_path_and_an_anchor(tmp_path: Path) -> None:
    """The parsers themselves, on a page of their own."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A `Title`: here\n\n[a](other.md#part) [b](https://example.com) ![c](pic.png)\n"
        "`service/app.py`, `application/json`, `tests/nowhere.py`\n"
        "```\n[d](inside-a-fence.md) `worker/in_fence.py`\n```\n"
    )
    assert list(_relative_links(page)) == ["other.md#part"]
    assert list(_repo_paths(page)) == ["service/app.py", "tests/nowhere.py"]
    assert _anchors(page) == {"a-title-here"}
