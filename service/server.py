"""The service as the runtime runs it (``shared/runtime/serving.py``): its port, its drain,
its protocol errors counted, and its collector settled once it has started."""

import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from shared.httpserver import ProtocolError
from shared.logs import Logs
from shared.runtime import serving
from shared.runtime.serving import Program, Running
from shared.settings import ServiceSettings
from shared.telemetry import SERVICE_PROGRAM, protocol_error_record
from shared.tracing import Tracing

from .app import create_app, drain
from .appkeys import INGEST

__all__ = ("SERVICE", "Running", "protocol_error_recorder", "running")


def protocol_error_recorder(app: web.Application) -> Callable[[ProtocolError], None]:
    """Each protocol error as a telemetry record, for the sidecar's
    ``pulsecal_http_protocol_errors_total{kind}``."""

    def record(error: ProtocolError) -> None:
        app[INGEST].telemetry.record(protocol_error_record(error.kind, error.status))

    return record


def _port(settings: ServiceSettings) -> int:
    return settings.port


SERVICE = Program(
    name=SERVICE_PROGRAM,
    create_app=create_app,
    port=_port,
    traced_as="pulsecal-api",
    drain=drain,
    protocol_errors=protocol_error_recorder,
    backlog=4096,
    freeze_gc=True,
)


@contextlib.asynccontextmanager
async def running(
    settings: ServiceSettings,
    *,
    host: str,
    tracing: Tracing | None = None,
    logs: Logs | None = None,
) -> AsyncIterator[Running]:
    """The service listening on ``host``:``settings.port`` (0: any free port, see
    ``Running.port``); leaving the block shuts it down within ``SHUTDOWN_TIMEOUT``."""
    async with serving.running(SERVICE, settings, host=host, tracing=tracing, logs=logs) as served:
        yield served
