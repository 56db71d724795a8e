"""One settings class per program, made of the sections it reads; loading one from the environment.

A program validates only the variables its class declares: a typo in a variable another
program reads stops that program, not this one.
"""

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

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
from .fields import redefault
from .specific import (
    AlertRulesSection,
    AlertsApiSection,
    AnalysisJobsSection,
    IngestSection,
    RateLimitSection,
    SidecarSection,
    WorkerSection,
)

__all__ = (
    "PROGRAMS",
    "AdminSettings",
    "AnalysisSettings",
    "DevStackSettings",
    "ProgramSettings",
    "ServiceSettings",
    "SettingsError",
    "SidecarSettings",
    "WorkerSettings",
    "load_settings",
    "load_settings_or_exit",
)


class SettingsError(ValueError):
    """A variable holds a value the program cannot use; the message names it."""


class ProgramSettings:
    """What every program's settings class has: the name of the program that reads it."""

    __slots__ = ()
    program: ClassVar[str]

    if TYPE_CHECKING:
        __dataclass_fields__: ClassVar[dict[str, "dataclasses.Field[Any]"]]


P = TypeVar("P", bound=ProgramSettings)

# In each class a section comes before the sections it inherits (Python's method resolution
# order wants it so); --help and the reference list them in SECTIONS' order (reference.py).


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings(
    ProgramSettings,
    ListenSection,
    HealthChecksSection,
    TracingSection,
    OperatorSection,
    HttpSection,
    ShutdownSection,
    TelemetrySection,
    RateLimitSection,
    IngestSection,
    AlertsApiSection,
):
    program = "pulsecal-service"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings(
    ProgramSettings,
    WorkerSection,
    HealthChecksSection,
    TracingSection,
    OperatorSection,
    HttpSection,
    ShutdownSection,
    TelemetrySection,
    AlertRulesSection,
    AnalysisJobsSection,
):
    program = "pulsecal-worker"


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarSettings(
    ProgramSettings,
    SidecarSection,
    HealthChecksSection,
    TracingSection,
    OperatorSection,
    HttpSection,
    TelemetrySection,
):
    program = "pulsecal-sidecar"


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalysisSettings(
    ProgramSettings, ListenSection, LoggingSection, OperatorSection, HttpSection
):
    program = "pulsecal-analysis"

    # PORT is the service's too, whose default is 3001.
    port: int = redefault(ListenSection, "port", 8000)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings(ProgramSettings, PostgresSection):
    program = "pulsecal-admin"


@dataclass(frozen=True, slots=True, kw_only=True)
class DevStackSettings(
    ProgramSettings,
    IdentitySection,
    ListenSection,
    RedisSection,
    PostgresSection,
    AiServiceSection,
    ShutdownSection,
    SidecarSection,
    WorkerSection,
):
    """The local stack (``make run``): where it finds Redis, Postgres and the ports to use;
    each program it starts reads its own settings from the same environment."""

    program = "devstack"


PROGRAMS: tuple[type[ProgramSettings], ...] = (
    ServiceSettings,
    WorkerSettings,
    SidecarSettings,
    AnalysisSettings,
    AdminSettings,
    DevStackSettings,
)


def load_settings(environ: Mapping[str, str], program: type[P]) -> P:
    """The settings ``program`` reads from ``environ``; a bad value is a SettingsError."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(program):
        name = field.metadata["env"]
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            values[field.name] = field.metadata["parse"](raw)
        except ValueError as e:
            shown = raw if len(raw) <= 60 else raw[:57] + "..."
            raise SettingsError(f"{name}={shown!r}: {e}") from e
    settings = program(**values)
    _check_heartbeat(settings)
    return settings


def _check_heartbeat(settings: ProgramSettings) -> None:
    # A heartbeat that expires before the next one is written would report a live process gone.
    if isinstance(settings, TelemetrySection) and (
        settings.heartbeat_ttl <= settings.heartbeat_interval
    ):
        raise SettingsError(
            f"HEARTBEAT_TTL={settings.heartbeat_ttl}: expected more than "
            f"HEARTBEAT_INTERVAL ({settings.heartbeat_interval})"
        )


def load_settings_or_exit(environ: Mapping[str, str], program: type[P]) -> P:
    """``load_settings``, or exit 2 with one line naming the program and the variable."""
    try:
        return load_settings(environ, program)
    except SettingsError as e:
        _exit_with(f"{program.program}: invalid configuration: {e}")


def _exit_with(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)
