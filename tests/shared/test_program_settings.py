"""Each program's settings class declares every variable its code reads, and no section it
does not read.

Read from the source (as ``tests/project/test_layout.py`` reads imports): every attribute
taken of a settings object (a name ``settings``, or ``app[SETTINGS]``) in the program's
package and in the shared modules it imports, where the object is handed over. mypy checks
the same through the annotations; this also covers code it cannot see, and says which
variable is missing.
"""

import ast
import inspect
from pathlib import Path

import pytest

from shared.settings import (
    SECTIONS,
    AdminSettings,
    AnalysisSettings,
    DevStackSettings,
    ProgramSettings,
    ServiceSettings,
    SidecarSettings,
    WorkerSettings,
    sections_of,
    variables,
)
from tests.support.paths import ROOT_DIR

# Where each program's own code is.
PROGRAM_CODE: dict[type[ProgramSettings], tuple[str, ...]] = {
    ServiceSettings: ("service",),
    WorkerSettings: ("worker",),
    SidecarSettings: ("sidecar",),
    AnalysisSettings: ("analysis",),
    AdminSettings: ("admin",),
    DevStackSettings: ("devtools/devstack.py",),
}
# Shared modules that read the settings as a whole, not as a program uses them.
NOT_READERS = ("shared/settings/", "shared/cli.py")
# What a section offers: its variables' attributes and its properties (Identity's ``pod``).
OFFERED = {
    section: {v.attribute for v in variables() if v.section is section}
    | {name for name, _ in inspect.getmembers(section, lambda m: isinstance(m, property))}
    for section in SECTIONS
}
KNOWN = set().union(*OFFERED.values())


def _modules(where: str) -> list[Path]:
    path = ROOT_DIR / where
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def _shared_imports(tree: ast.Module) -> set[Path]:
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "shared":
                names = [f"shared.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("shared."):
                module = ROOT_DIR / (name.replace(".", "/") + ".py")
                if module.is_file():
                    found.add(module)
    return found


def _is_settings(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "settings"
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name):
        return node.slice.id.lstrip("_") == "SETTINGS"
    return False


def _reads(tree: ast.Module) -> set[str]:
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and _is_settings(node.value) and node.attr in KNOWN
    }


def program_reads(program: type[ProgramSettings]) -> set[str]:
    """The settings attributes the program's code and the shared modules it imports read."""
    own = [path for where in PROGRAM_CODE[program] for path in _modules(where)]
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in own}
    for tree in list(trees.values()):
        for path in _shared_imports(tree):
            if not str(path.relative_to(ROOT_DIR)).startswith(NOT_READERS):
                trees.setdefault(path, ast.parse(path.read_text(), filename=str(path)))
    return set().union(*(_reads(tree) for tree in trees.values()))


def test_every_program_is_checked() -> None:
    assert set(PROGRAM_CODE) == {
        ServiceSettings,
        WorkerSettings,
        SidecarSettings,
        AnalysisSettings,
        AdminSettings,
        DevStackSettings,
    }


@pytest.mark.parametrize("program", PROGRAM_CODE, ids=lambda p: p.program)
def test_a_program_declares_every_setting_its_code_reads(program: type[ProgramSettings]) -> None:
    reads = program_reads(program)

    assert reads, "no reads found: is PROGRAM_CODE right?"
    assert sorted(name for name in reads if not hasattr(program, name)) == []


@pytest.mark.parametrize("program", PROGRAM_CODE, ids=lambda p: p.program)
def test_a_program_reads_something_of_every_section_it_declares(
    program: type[ProgramSettings],
) -> None:
    reads = program_reads(program)

    unread = [section.title for section in sections_of(program) if not OFFERED[section] & reads]
    assert unread == []
