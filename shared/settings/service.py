"""What ``pulsecal-service`` reads."""

from dataclasses import dataclass

from .common import (
    HealthChecksSection,
    HttpSection,
    ListenSection,
    OperatorSection,
    ShutdownSection,
    TelemetrySection,
    TracingSection,
)
from .programs import ProgramSettings
from .specific import AlertsApiSection, IngestSection, PartitionsSection, RateLimitSection

__all__ = ("ServiceSettings",)

# A section comes before the sections it inherits (Python's method resolution order wants
# it so); --help and the reference list them in SECTIONS' order (reference.py).


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
    PartitionsSection,
    AlertsApiSection,
):
    program = "pulsecal-service"
