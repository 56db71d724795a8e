"""The committed locks agree with the metadata they were compiled from, and the venv is the lock.

Offline on purpose: ``make lock`` asks the index, this test only reads files and installed
metadata, so it gives the same answer whatever the registries serve today. It fails when
setup.cfg or requirements-tools.in gains, loses or narrows a dependency without ``make lock``.
"""

import configparser
import re
from collections.abc import Iterable, Iterator
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from tests.support.paths import ROOT_DIR

ROOT = ROOT_DIR
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)")
_PROJECT = canonicalize_name("pulsecal")
_DEVTOOLS = canonicalize_name("pulsecal-devtools")


def _read_lock(name: str) -> dict[NormalizedName, Version]:
    pins: dict[NormalizedName, Version] = {}
    lines = (ROOT / name).read_text().splitlines()
    for number, line in enumerate(lines):
        match = _PIN.match(line)
        if match is None:
            continue
        # Hashes follow the pin on continuation lines: every pin has at least one.
        assert lines[number + 1].strip().startswith("--hash=sha256:"), f"{name}: {line} unhashed"
        pins[canonicalize_name(match["name"])] = Version(match["version"])
    assert pins, f"{name} pins nothing"
    return pins


def _requirement_lines(lines: Iterable[str]) -> Iterator[Requirement]:
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            yield Requirement(text)


def _project_requirements() -> tuple[list[Requirement], list[Requirement]]:
    """setup.cfg's install_requires, and every extra's requirements."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    runtime = list(_requirement_lines(config["options"]["install_requires"].splitlines()))
    extras = [
        requirement
        for _, block in config["options.extras_require"].items()
        for requirement in _requirement_lines(block.splitlines())
    ]
    return runtime, extras


def _tools_requirements() -> list[Requirement]:
    return list(_requirement_lines((ROOT / "requirements-tools.in").read_text().splitlines()))


def _applies(requirement: Requirement, extra: str = "") -> bool:
    if requirement.marker is None:
        return True
    environment: dict[str, str] = {**default_environment(), "extra": extra}
    return requirement.marker.evaluate(environment)


def _closure(roots: Iterable[Requirement]) -> set[NormalizedName]:
    """Every distribution the roots need here, followed through installed metadata."""
    seen: set[NormalizedName] = set()
    pending = [(requirement, "") for requirement in roots]
    while pending:
        requirement, extra = pending.pop()
        if not _applies(requirement, extra):
            continue
        name = canonicalize_name(requirement.name)
        wanted_extras = sorted(requirement.extras)
        key_extras = [canonicalize_name(f"{name}[{e}]") for e in wanted_extras]
        if name in seen and all(k in seen for k in key_extras):
            continue
        seen.add(name)
        seen.update(key_extras)
        for dependency in metadata.requires(name) or ():
            parsed = Requirement(dependency)
            if parsed.marker is None:
                pending.append((parsed, ""))
            else:
                pending.extend((parsed, e) for e in ["", *wanted_extras])
    return {name for name in seen if "[" not in name}


def _assert_satisfied(
    requirements: Iterable[Requirement], pins: dict[NormalizedName, Version]
) -> None:
    for requirement in requirements:
        if not _applies(requirement):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not locked: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{requirement} excludes the locked {name}=={pins[name]}: run make lock"
        )


def test_the_locks_satisfy_the_metadata_they_come_from() -> None:
    runtime, extras = _project_requirements()
    _assert_satisfied(runtime, _read_lock("requirements.txt"))
    _assert_satisfied(runtime + extras + _tools_requirements(), _read_lock("requirements-dev.txt"))
    _assert_satisfied(_tools_requirements(), _read_lock("requirements-tools.txt"))


@pytest.mark.parametrize("subset", ["requirements.txt", "requirements-tools.txt"])
def test_every_lock_pins_the_same_versions_as_the_dev_lock(subset: str) -> None:
    dev = _read_lock("requirements-dev.txt")
    pins = _read_lock(subset)
    assert {name: dev.get(name) for name in pins} == pins


def test_the_locks_pin_exactly_what_the_metadata_needs() -> None:
    """Nothing missing, nothing stale: a dependency dropped from setup.cfg leaves the lock too."""
    runtime, extras = _project_requirements()
    tools = _tools_requirements()
    assert set(_read_lock("requirements.txt")) == _closure(runtime)
    assert set(_read_lock("requirements-tools.txt")) == _closure(tools)
    assert set(_read_lock("requirements-dev.txt")) == _closure(runtime + extras + tools)


def test_the_environment_is_exactly_the_dev_lock() -> None:
    installed = {
        canonicalize_name(dist.metadata["Name"]): Version(dist.version)
        for dist in metadata.distributions()
    }
    assert installed.pop(_PROJECT) == Version(metadata.version("pulsecal"))
    assert installed.pop(_DEVTOOLS) == Version(metadata.version("pulsecal-devtools"))
    assert installed == _read_lock("requirements-dev.txt")


def test_the_devtools_need_nothing_the_project_does_not_lock() -> None:
    """devtools/ is installed with --no-deps beside pulsecal: it declares nothing to lock."""
    assert metadata.requires("pulsecal-devtools") in (None, [])


def test_aiohttp_is_locked_to_the_release_its_fast_paths_were_written_against() -> None:
    # service/fastpath/acks.py and service/fastpath/wsframes.py reach into aiohttp internals; their
    # fast-path-taken tests trip on an upgrade that changes them. Moving this pin is an
    # upgrade of its own: run those tests, then change the version here.
    assert _read_lock("requirements.txt")[canonicalize_name("aiohttp")] == Version("3.14.5")
