"""What the local stack (``python -m devtools.devstack``) reads."""

from dataclasses import dataclass

from .common import (
    AiServiceSection,
    IdentitySection,
    ListenSection,
    PostgresSection,
    RedisSection,
    ShutdownSection,
)
from .programs import ProgramSettings
from .specific import SidecarSection, WorkerSection

__all__ = ("DevStackSettings",)

# A section comes before the sections it inherits (Python's method resolution order wants
# it so); --help and the reference list them in SECTIONS' order (reference.py).


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
