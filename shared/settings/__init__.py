"""Configuration: environment variables read once into a frozen, typed object per program.

``common.py`` and ``specific.py`` group the variables by concern into sections (the
fields and their metadata: ``fields.py``, their parsers: ``values.py``); each program's
class inherits the sections it reads (``service.py``, ``worker.py``, ...) and
``programs.py`` loads one; ``reference.py`` describes them for ``--help`` and
``docs/configuration.md`` (``python -m shared.settings --markdown``).

Names are imported from their modules when first asked for: every process starts by
loading its settings, and building every program's class (whose generated methods are
compiled at import) would cost each of them the others' share.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from .programs import ProgramSettings, SettingsError, load_settings, load_settings_or_exit
    from .reference import (
        PROGRAMS,
        REGENERATE,
        SECTIONS,
        Variable,
        configuration_markdown,
        format_default,
        sections_of,
        variables,
    )
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

_MODULES = {
    "admin": ("AdminSettings",),
    "analysis": ("AnalysisSettings",),
    "common": (
        "AiServiceSection",
        "HealthChecksSection",
        "HttpSection",
        "IdentitySection",
        "ListenSection",
        "LoggingSection",
        "OperatorSection",
        "PostgresSection",
        "RedisSection",
        "ShutdownSection",
        "TelemetrySection",
        "TracingSection",
    ),
    "devstack": ("DevStackSettings",),
    "fields": ("Section",),
    "programs": ("ProgramSettings", "SettingsError", "load_settings", "load_settings_or_exit"),
    "reference": (
        "PROGRAMS",
        "REGENERATE",
        "SECTIONS",
        "Variable",
        "configuration_markdown",
        "format_default",
        "sections_of",
        "variables",
    ),
    "service": ("ServiceSettings",),
    "sidecar": ("SidecarSettings",),
    "specific": (
        "AlertRulesSection",
        "AlertsApiSection",
        "AnalysisJobsSection",
        "IngestSection",
        "PartitionsSection",
        "RateLimitSection",
        "SidecarSection",
        "WorkerSection",
    ),
    "worker": ("WorkerSettings",),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = (
    "PROGRAMS",
    "REGENERATE",
    "SECTIONS",
    "AdminSettings",
    "AiServiceSection",
    "AlertRulesSection",
    "AlertsApiSection",
    "AnalysisJobsSection",
    "AnalysisSettings",
    "DevStackSettings",
    "HealthChecksSection",
    "HttpSection",
    "IdentitySection",
    "IngestSection",
    "ListenSection",
    "LoggingSection",
    "OperatorSection",
    "PartitionsSection",
    "PostgresSection",
    "ProgramSettings",
    "RateLimitSection",
    "RedisSection",
    "Section",
    "ServiceSettings",
    "SettingsError",
    "ShutdownSection",
    "SidecarSection",
    "SidecarSettings",
    "TelemetrySection",
    "TracingSection",
    "Variable",
    "WorkerSection",
    "WorkerSettings",
    "configuration_markdown",
    "format_default",
    "load_settings",
    "load_settings_or_exit",
    "sections_of",
    "variables",
)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
