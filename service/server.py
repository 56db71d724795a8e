"""The service on its port: the app served through ``shared/httpserver.py``'s connections
(JSON refusals, read deadlines), its protocol errors counted, and the drain on shutdown."""

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from shared.httpserver import HttpServer, Limits, ProtocolError
from shared.logs import Logs
from shared.settings import Settings
from shared.telemetry import protocol_error_record
from shared.tracing import Tracing

from .app import create_app, drain
from .appkeys import INGEST

__all__ = ("Running", "protocol_error_recorder", "running")

# aiohttp's own shutdown, after drain() has answered what could be answered: what is left
# of a handler is cancelled after this long.
_RUNNER_SHUTDOWN_TIMEOUT = 2.0


def protocol_error_recorder(app: web.Application) -> Callable[[ProtocolError], None]:
    """Each protocol error as a telemetry record, for the sidecar's
    ``pulsecal_http_protocol_errors_total{kind}``."""

    def record(error: ProtocolError) -> None:
        app[INGEST].telemetry.record(protocol_error_record(error.kind, error.status))

    return record


@dataclass(slots=True, eq=False)
class Running:
    app: web.Application
    runner: web.AppRunner
    http: HttpServer
    grace: float
    _stopped: bool = field(default=False, init=False)

    @property
    def port(self) -> int:
        return self.http.port

    async def shutdown(self) -> None:
        """Stop accepting, drain (``drain``), then aiohttp's own cleanup. Once."""
        if self._stopped:
            return
        self._stopped = True
        await self.http.stop_accepting()
        try:
            await drain(self.app, grace=self.grace, http=self.http)
        finally:
            await self.http.close()
            await self.runner.cleanup()


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    *,
    host: str,
    tracing: Tracing | None = None,
    logs: Logs | None = None,
) -> AsyncIterator[Running]:
    """The service listening on ``host``:``settings.port`` (0: any free port, see
    ``Running.port``); leaving the block shuts it down within ``SHUTDOWN_TIMEOUT``."""
    app = create_app(settings, tracing=tracing, logs=logs)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=_RUNNER_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    server = runner.server
    assert server is not None
    http = HttpServer(
        runner, limits=Limits.from_settings(settings), on_error=protocol_error_recorder(app)
    )
    service = Running(app, runner, http, settings.shutdown_timeout)
    try:
        await http.start(host, settings.port, backlog=4096, reuse_address=True)
        app[INGEST].count_connections = lambda: len(server.connections)
        yield service
    finally:
        await service.shutdown()
