"""What ``pulsecal-admin`` reads."""

from dataclasses import dataclass

from .common import PostgresSection
from .programs import ProgramSettings

__all__ = ("AdminSettings",)

# A section comes before the sections it inherits (Python's method resolution order wants
# it so); --help and the reference list them in SECTIONS' order (reference.py).


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings(ProgramSettings, PostgresSection):
    program = "pulsecal-admin"
