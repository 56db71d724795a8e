"""Settings of one program made from another's, as two processes of a pod read one environment."""

import dataclasses
from typing import Any, TypeVar

from shared.settings import ProgramSettings, variables

__all__ = ("SETTINGS_VARIABLES", "for_program")

P = TypeVar("P", bound=ProgramSettings)

# Every variable some program reads: what a test's child process must not inherit.
SETTINGS_VARIABLES = frozenset(variable.name for variable in variables())


def for_program(program: type[P], settings: ProgramSettings, **changes: Any) -> P:
    """``program``'s settings with every value it shares with ``settings``, then ``changes``."""
    shared = {f.name for f in dataclasses.fields(settings)}
    values = {
        f.name: getattr(settings, f.name) for f in dataclasses.fields(program) if f.name in shared
    }
    return program(**{**values, **changes})
