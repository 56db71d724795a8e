"""The layout: one package per process, each importing only ``shared/``; nothing the image
ships imports the development tools; ``shared/`` imports no process.

Read from the source's import statements (static, so a lazy import inside a function counts
too), not from what happens to be loaded.
"""

import ast
from pathlib import Path

import pytest

from tests.support.paths import ROOT_DIR

# The processes, each its own package; shared/ is what they have in common; devtools/ is
# what only a developer's machine runs.
PROCESSES = ("service", "worker", "analysis", "admin", "sidecar")
SHARED = "shared"
DEVTOOLS = "devtools"
FIRST_PARTY = (*PROCESSES, SHARED, DEVTOOLS)


def _modules(package: str) -> list[Path]:
    return sorted((ROOT_DIR / package).rglob("*.py"))


def _imports(path: Path, own: str | None = None) -> set[str]:
    """The first-party top-level packages a module imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = own or path.relative_to(ROOT_DIR).parts[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # A relative import can only reach inside its own top-level package.
            names = [own] if node.level else [node.module or ""]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in FIRST_PARTY)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in FIRST_PARTY:
        for path in _modules(package):
            graph[str(path.relative_to(ROOT_DIR))] = _imports(path) - {package}
    return graph


def test_every_first_party_package_has_modules() -> None:
    for package in FIRST_PARTY:
        assert (ROOT_DIR / package / "__init__.py").is_file(), package


@pytest.mark.parametrize("process", PROCESSES)
def test_a_process_package_imports_only_shared(process: str) -> None:
    crossing = {
        module: imported
        for module, imported in _graph().items()
        if module.startswith(f"{process}/") and imported - {SHARED}
    }
    assert crossing == {}


def test_shared_imports_no_process_and_no_devtools() -> None:
    upward = {
        module: imported
        for module, imported in _graph().items()
        if module.startswith(f"{SHARED}/") and imported
    }
    assert upward == {}


def test_devtools_use_only_shared_and_run_the_processes_as_programs() -> None:
    """The simulator and the local stack start the console scripts; they import no process."""
    reaching = {
        module: imported
        for module, imported in _graph().items()
        if module.startswith(f"{DEVTOOLS}/") and imported - {SHARED}
    }
    assert reaching == {}


def test_the_check_sees_a_crossing_import(tmp_path: Path) -> None:
    """The parser itself: an absolute and a relative import are both found."""
    module = tmp_path / "probe.py"
    module.write_text(
        "import json\nfrom service.store import ReadingsWriter\nfrom . import persist\n"
        "def later():\n    import sidecar.app\n"
    )
    assert _imports(module, own="worker") == {"service", "worker", "sidecar"}


def test_no_test_imports_a_private_name_of_the_code() -> None:
    """Tests use what the code offers; a private name is free to change without them."""
    private = []
    for path in sorted((ROOT_DIR / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module.split(".")[0] not in FIRST_PARTY:
                    continue
                private += [
                    f"{path.relative_to(ROOT_DIR)}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert private == []
