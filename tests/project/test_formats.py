"""Formats that cross a process boundary have one owner in ``shared/``: no other module
spells a Redis key layout, or writes a readings entry's fields by their literal names."""

import re
from pathlib import Path

import pytest

from tests.support.paths import ROOT_DIR

# Everything that talks to Redis: the processes, the tools, the benchmarks, the test helpers.
SOURCES = ("service", "worker", "analysis", "admin", "sidecar", "shared", "devtools", "bench")
HELPERS = ROOT_DIR / "tests" / "support"
KEYS = ROOT_DIR / "shared" / "keys.py"
READINGS = ROOT_DIR / "shared" / "readings.py"
# A key under one of the hash tags shared/keys.py gives out, in a string or an f-string.
KEY_LAYOUT = re.compile(r"\{\{?(ingest|jobs)\}\}?:")
# A readings field named by its literal: in an XADD or a mapping written, or read back.
READINGS_FIELDS = re.compile(
    r"""(?:\{|XADD.*?)\s*b?['"](?:d|r|t)['"]\s*[:,]|(?:\.get\(|\[)b['"](?:d|r|t)['"]\s*[\])]"""
)


def _modules() -> list[Path]:
    found = [path for package in SOURCES for path in sorted((ROOT_DIR / package).rglob("*.py"))]
    return found + sorted(HELPERS.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT_DIR)))
def test_only_shared_keys_spells_a_key_layout(path: Path) -> None:
    if path == KEYS:
        return
    assert KEY_LAYOUT.findall(path.read_text()) == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT_DIR)))
def test_readings_entries_are_written_with_the_shared_field_names(path: Path) -> None:
    if path == READINGS:
        return
    assert READINGS_FIELDS.findall(path.read_text()) == []
