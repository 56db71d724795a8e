"""What ``pulsecal-sidecar`` reads."""

from dataclasses import dataclass

from .common import (
    HealthChecksSection,
    HttpSection,
    OperatorSection,
    TelemetrySection,
    TracingSection,
)
from .programs import ProgramSettings
from .specific import SidecarSection

__all__ = ("SidecarSettings",)

# A section comes before the sections it inherits (Python's method resolution order wants
# it so); --help and the reference list them in SECTIONS' order (reference.py).


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
