"""What each variable is, read off the section classes: for ``--help`` and the reference doc.

Only ``--help``, the reference and the tests import this module (and with it every
program's class); a running program builds its own class alone.

Nothing here is typed twice: the name, default and description come from the field, what it
accepts from its parser, which programs read it from the program classes.
"""

import dataclasses
import inspect
from collections.abc import Iterable
from dataclasses import dataclass

from .admin import AdminSettings
from .analysis import AnalysisSettings
from .common import (
    AiServiceSection,
    HealthChecksSection,
    HttpSection,
    IdentitySection,
    ListenSection,
    LoggingSection,
    OperatorSection,
    PostgresSection,
    RedisSection,
    ShutdownSection,
    TelemetrySection,
    TracingSection,
)
from .devstack import DevStackSettings
from .fields import Section
from .programs import ProgramSettings
from .service import ServiceSettings
from .sidecar import SidecarSettings
from .specific import (
    AlertRulesSection,
    AlertsApiSection,
    AnalysisJobsSection,
    IngestSection,
    PartitionsSection,
    RateLimitSection,
    SidecarSection,
    WorkerSection,
)
from .worker import WorkerSettings

__all__ = (
    "PROGRAMS",
    "REGENERATE",
    "SECTIONS",
    "Variable",
    "configuration_markdown",
    "format_default",
    "sections_of",
    "variables",
)

# Every program's settings class, in the order of docs/configuration.md.
PROGRAMS: tuple[type[ProgramSettings], ...] = (
    ServiceSettings,
    WorkerSettings,
    SidecarSettings,
    AnalysisSettings,
    AdminSettings,
    DevStackSettings,
)

# The command that writes docs/configuration.md.
REGENERATE = "make config-doc"

# The order of --help and docs/configuration.md.
SECTIONS: tuple[type[Section], ...] = (
    IdentitySection,
    ListenSection,
    RedisSection,
    PostgresSection,
    AiServiceSection,
    LoggingSection,
    TracingSection,
    OperatorSection,
    HealthChecksSection,
    HttpSection,
    ShutdownSection,
    TelemetrySection,
    RateLimitSection,
    IngestSection,
    PartitionsSection,
    AlertsApiSection,
    SidecarSection,
    WorkerSection,
    AlertRulesSection,
    AnalysisJobsSection,
)


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    attribute: str
    section: type[Section]
    # The default of the program asked about; without one, the section's.
    default: object
    accepts: str
    description: str
    secret: bool
    # The programs whose classes declare it, in PROGRAMS' order.
    programs: tuple[str, ...]


def sections_of(program: type[ProgramSettings]) -> tuple[type[Section], ...]:
    """The sections ``program`` reads, in SECTIONS' order."""
    return tuple(section for section in SECTIONS if issubclass(program, section))


def _declared(section: type[Section]) -> list["dataclasses.Field[object]"]:
    own = inspect.get_annotations(section)
    return [f for f in dataclasses.fields(section) if f.name in own]


def variables(program: type[ProgramSettings] | None = None) -> tuple[Variable, ...]:
    """The variables ``program`` reads (every variable without one), section by section."""
    sections = SECTIONS if program is None else sections_of(program)
    defaults = {} if program is None else {f.name: f.default for f in dataclasses.fields(program)}
    found: list[Variable] = []
    for section in sections:
        readers = tuple(p.program for p in PROGRAMS if issubclass(p, section))
        for field in _declared(section):
            meta = field.metadata
            found.append(
                Variable(
                    name=meta["env"],
                    attribute=field.name,
                    section=section,
                    default=defaults.get(field.name, field.default),
                    accepts=meta["parse"].accepts,
                    description=meta["description"],
                    secret=meta["secret"],
                    programs=readers,
                )
            )
    return tuple(found)


def format_default(value: object) -> str:
    """A default as one would write it in the environment; "" when it is empty or unset."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default_cell(variable: Variable) -> str:
    shown = format_default(variable.default)
    cell = f"`{shown}`" if shown else ("unset" if variable.default is None else "empty")
    others = [
        f"{program.program}: `{format_default(own.default)}`"
        for program in PROGRAMS
        for own in variables(program)
        if own.name == variable.name and own.default != variable.default
    ]
    return "; ".join([cell, *others])


def _table(rows: Iterable[Variable]) -> list[str]:
    lines = [
        "| variable | default | accepts | description | read by |",
        "|---|---|---|---|---|",
    ]
    for v in rows:
        description = v.description + (" (secret: never logged or shown)" if v.secret else "")
        lines.append(
            f"| `{v.name}` | {_cell(_default_cell(v))} | {_cell(v.accepts)} "
            f"| {_cell(description)} | {', '.join(v.programs)} |"
        )
    return lines


def configuration_markdown() -> str:
    """``docs/configuration.md``: every section, every variable, which program reads what."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from shared/settings/ by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every program reads its variables once at start, into a frozen settings object of its",
        "own; a bad value stops it with one line naming the variable (exit 2). A program reads",
        "only the sections listed for it below and ignores every other variable. Unset",
        "variables take the default shown; a program's own default, where it differs, follows",
        "the section's. `--help` of each program lists the same.",
        "",
        "| program | sections |",
        "|---|---|",
    ]
    for program in PROGRAMS:
        titles = ", ".join(section.title for section in sections_of(program))
        lines.append(f"| {program.program} | {titles} |")
    by_section: dict[type[Section], list[Variable]] = {}
    for variable in variables():
        by_section.setdefault(variable.section, []).append(variable)
    for section in SECTIONS:
        lines += ["", f"## {section.title}", ""]
        doc = inspect.getdoc(section)
        if doc:
            for paragraph in doc.split("\n\n"):
                lines += [" ".join(paragraph.split()), ""]
        lines += _table(by_section[section])
    return "\n".join(lines) + "\n"
