"""What a program's settings class is, and loading one from the environment.

Each program's class (``service.py``, ``worker.py``, ``sidecar.py``, ``analysis.py``,
``admin.py``, ``devstack.py``) inherits the sections it reads; a module each, so that a
process builds only its own. A program validates only the variables its class declares:
a typo in a variable another program reads stops that program, not this one.
"""

import dataclasses
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar
from urllib.parse import urlsplit

from .common import RedisSection, TelemetrySection
from .specific import IngestSection, WorkerSection

__all__ = (
    "ProgramSettings",
    "SettingsError",
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
    _check_pod_keys_grace(settings)
    _check_ack_timeout(settings)
    _check_cluster_url(settings)
    return settings


def _check_cluster_url(settings: ProgramSettings) -> None:
    # A cluster has only database 0 and is reached over TCP: a URL saying otherwise would start
    # a program that fails at its first command rather than at once. The URL may carry a
    # password, so the message does not repeat it.
    if not (isinstance(settings, RedisSection) and settings.redis_cluster):
        return
    url = urlsplit(settings.redis_url)
    if url.scheme == "unix":
        raise SettingsError("REDIS_URL: with REDIS_CLUSTER, a redis:// or rediss:// URL")
    if url.path.strip("/") not in ("", "0"):
        raise SettingsError("REDIS_URL: with REDIS_CLUSTER, database 0 (a cluster has no other)")


def _check_heartbeat(settings: ProgramSettings) -> None:
    # A heartbeat that expires before the next one is written would report a live process gone.
    if isinstance(settings, TelemetrySection) and (
        settings.heartbeat_ttl <= settings.heartbeat_interval
    ):
        raise SettingsError(
            f"HEARTBEAT_TTL={settings.heartbeat_ttl}: expected more than "
            f"HEARTBEAT_INTERVAL ({settings.heartbeat_interval})"
        )


def _check_pod_keys_grace(settings: ProgramSettings) -> None:
    # A pod counts as gone once its heartbeat is older than the grace: a grace within the
    # heartbeat's own life would remove the keys of pods that are alive.
    if (
        isinstance(settings, WorkerSection)
        and isinstance(settings, TelemetrySection)
        and settings.pod_keys_grace <= settings.heartbeat_ttl
    ):
        raise SettingsError(
            f"POD_KEYS_GRACE={settings.pod_keys_grace}: expected more than "
            f"HEARTBEAT_TTL ({settings.heartbeat_ttl})"
        )


def _check_ack_timeout(settings: ProgramSettings) -> None:
    # A write waiting for its replicas longer than a write may take would be cut off by the
    # write timeout first: every write would fail on a slow replica instead of being refused.
    if (
        isinstance(settings, IngestSection)
        and settings.ack_mode == "replicated"
        and settings.ack_timeout >= settings.write_timeout
    ):
        raise SettingsError(
            f"ACK_TIMEOUT={settings.ack_timeout}: expected less than "
            f"WRITE_TIMEOUT ({settings.write_timeout})"
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
