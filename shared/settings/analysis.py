"""What ``pulsecal-analysis`` reads."""

from dataclasses import dataclass

from .common import HttpSection, ListenSection, LoggingSection, OperatorSection
from .fields import redefault
from .programs import ProgramSettings

__all__ = ("AnalysisSettings",)

# A section comes before the sections it inherits (Python's method resolution order wants
# it so); --help and the reference list them in SECTIONS' order (reference.py).


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalysisSettings(
    ProgramSettings, ListenSection, LoggingSection, OperatorSection, HttpSection
):
    program = "pulsecal-analysis"

    # PORT is the service's too, whose default is 3001.
    port: int = redefault(ListenSection, "port", 8000)
