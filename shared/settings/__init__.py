"""Configuration: environment variables read once into a frozen, typed object per program.

``common.py`` and ``specific.py`` group the variables by concern into sections (the
fields and their metadata: ``fields.py``, their parsers: ``values.py``), ``programs.py``
composes each program's class from the sections it reads and loads it, ``reference.py``
describes them for ``--help`` and ``docs/configuration.md``
(``python -m shared.settings --markdown``).
"""

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
from .fields import Section
from .programs import (
    PROGRAMS,
    AdminSettings,
    AnalysisSettings,
    DevStackSettings,
    ProgramSettings,
    ServiceSettings,
    SettingsError,
    SidecarSettings,
    WorkerSettings,
    load_settings,
    load_settings_or_exit,
)
from .reference import (
    REGENERATE,
    SECTIONS,
    Variable,
    configuration_markdown,
    format_default,
    sections_of,
    variables,
)
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
