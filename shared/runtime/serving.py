"""Running a program: one way to start it, serve it and stop it, for every long-running one.

``run`` is what a program's ``main()`` calls once it has its settings and its logging: it
sets up tracing (when the program is traced), runs ``serve`` on uvloop and shuts tracing
down on the way out. ``serve`` listens through ``shared/httpserver.py``'s ``HttpServer``
(JSON refusals, read deadlines, ``Server: pulsecal``) until SIGTERM or SIGINT, then stops.

Stopping (``Running.shutdown``): the listener closes; the program's ``drain`` runs; then
aiohttp's own shutdown: ``on_shutdown`` handlers, up to ``HANDLER_GRACE`` seconds for the
handlers still running, and the cleanup contexts in reverse (the service's writes flushed,
the worker's round committed, the sidecar's checkpoint saved, the last heartbeat written).

The ``drain`` is run by hand, before aiohttp's shutdown, because aiohttp's first step
(``pre_shutdown``) closes every idle keep-alive connection at once: a request a client has
just sent on one would be cut off unanswered. The service's drain instead lets such
requests in and answers them with ``Connection: close`` before it closes what is idle.
"""

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import web
from loguru import logger

from shared.appkeys import HTTP_SERVER
from shared.httpserver import ErrorSink, HttpServer, HttpTimeouts, Limits
from shared.logs import Logs, install_loop_handler
from shared.settings import TracingSection
from shared.tracing import Tracing, setup_tracing

__all__ = (
    "HANDLER_GRACE",
    "AppFactory",
    "Program",
    "Running",
    "ServedSettings",
    "run",
    "running",
    "serve",
)

# aiohttp's own shutdown, after the program's drain has answered what could be answered:
# what is left of a handler is cancelled after this long.
HANDLER_GRACE = 2.0


class ServedSettings(HttpTimeouts, Protocol):
    """What the runtime reads of a served program's settings, besides its port: every
    served program's class has these (``HttpSection``, ``IdentitySection``)."""

    @property
    def pod(self) -> str: ...


S = TypeVar("S", bound=ServedSettings)
S_contra = TypeVar("S_contra", bound=ServedSettings, contravariant=True)


class AppFactory(Protocol[S_contra]):
    def __call__(
        self, settings: S_contra, /, *, tracing: Tracing | None = ..., logs: Logs | None = ...
    ) -> web.Application: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Program(Generic[S]):
    """What the runtime needs to know of a program besides its settings."""

    # The console script, as the logs name it.
    name: str
    create_app: AppFactory[S]
    # The setting that holds its port.
    port: Callable[[S], int]
    # Its OpenTelemetry service name; None: the program is not traced.
    traced_as: str | None = None
    # Run once the listener is closed, before aiohttp's shutdown (see the module docstring).
    drain: Callable[[web.Application], Awaitable[None]] | None = None
    # What to do with each request refused below the routes, besides the sampled warning.
    protocol_errors: Callable[[web.Application], ErrorSink] | None = None
    backlog: int = 128
    # Freeze what start-up allocated out of the collector's reach (see ``_settle_gc``).
    freeze_gc: bool = False


@dataclass(slots=True, eq=False)
class Running:
    """A program listening; ``shutdown`` stops it, once."""

    app: web.Application
    runner: web.AppRunner
    http: HttpServer
    drain: Callable[[web.Application], Awaitable[None]] | None = None
    _stopped: bool = field(default=False, init=False)

    @property
    def port(self) -> int:
        return self.http.port

    async def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.http.stop_accepting()
        try:
            if self.drain is not None:
                await self.drain(self.app)
        finally:
            await self.http.close()
            await self.runner.cleanup()


@contextlib.asynccontextmanager
async def running(
    program: Program[S],
    settings: S,
    *,
    host: str,
    tracing: Tracing | None = None,
    logs: Logs | None = None,
) -> AsyncIterator[Running]:
    """``program`` listening on ``host`` and its port setting (0: any free port, see
    ``Running.port``); leaving the block shuts it down."""
    app = program.create_app(settings, tracing=tracing, logs=logs)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=HANDLER_GRACE
    )
    on_error = None if program.protocol_errors is None else program.protocol_errors(app)
    http = HttpServer(runner, limits=Limits.from_settings(settings), on_error=on_error)
    # Before the start-up, which freezes the app: its cleanup contexts may read it.
    app[HTTP_SERVER] = http
    await runner.setup()
    served = Running(app, runner, http, program.drain)
    try:
        await http.start(host, program.port(settings), backlog=program.backlog, reuse_address=True)
        yield served
    finally:
        await served.shutdown()


def _settle_gc() -> None:
    # Everything made so far (modules, the app, its clients, the token cache) lives as long
    # as the process: frozen, a full collection no longer walks it; and the young generation
    # is collected per 20,000 allocations, not 700. Under load (make bench) this took the
    # service's p99 from 8-14 ms to 5-6 ms with tracing on.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Left installed: a second signal while the program drains changes nothing.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve(
    program: Program[S],
    settings: S,
    *,
    host: str = "0.0.0.0",
    tracing: Tracing | None = None,
    logs: Logs | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down (``Running.shutdown``)."""
    install_loop_handler(asyncio.get_running_loop())
    async with running(program, settings, host=host, tracing=tracing, logs=logs) as served:
        if program.freeze_gc:
            _settle_gc()
        logger.info(
            "{} listening on {}:{} as pod {}", program.name, host, served.port, settings.pod
        )
        await _until_signalled()
        logger.info("shutting down")
    logger.info("shutdown complete")


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _tracing(name: str, traced_as: str | None, settings: object) -> Tracing | None:
    if traced_as is None:
        return None
    if not isinstance(settings, TracingSection):
        raise TypeError(f"{name} is traced: its settings need the tracing section")
    return setup_tracing(settings, service_name=traced_as)


def run(program: Program[S], settings: S, *, logs: Logs | None = None) -> None:
    """The program's process, from its settings and logging (``setup_logging``) to its exit."""
    tracing = _tracing(program.name, program.traced_as, settings)
    try:
        _run_loop(serve(program, settings, tracing=tracing, logs=logs))
    finally:
        if tracing is not None:
            tracing.shutdown()  # exports what is queued, within the exporter's timeout
