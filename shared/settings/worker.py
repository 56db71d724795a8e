"""What ``pulsecal-worker`` reads."""

from dataclasses import dataclass

from .common import (
    HealthChecksSection,
    HttpSection,
    OperatorSection,
    ShutdownSection,
    TelemetrySection,
    TracingSection,
)
from .programs import ProgramSettings
from .specific import AlertRulesSection, AnalysisJobsSection, PartitionsSection, WorkerSection

__all__ = ("WorkerSettings",)

# A section comes before the sections it inherits (Python's method resolution order wants
# it so); --help and the reference list them in SECTIONS' order (reference.py).


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings(
    ProgramSettings,
    WorkerSection,
    PartitionsSection,
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
