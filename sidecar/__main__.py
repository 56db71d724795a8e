"""``pulsecal-sidecar``: load settings, set up logging, serve until SIGTERM, save and exit."""

import asyncio
import os
import signal
from collections.abc import Sequence

from aiohttp import web
from loguru import logger

from shared.cli import parse_program_args
from shared.httpserver import HttpServer, Limits
from shared.logs import install_loop_handler, setup_logging
from shared.settings import SidecarSettings, load_settings_or_exit
from shared.tracing import Tracing, setup_tracing

from .app import create_app

__all__ = ("main", "serve")

PROGRAM = "pulsecal-sidecar"
DESCRIPTION = """
The PulseCal sidecar: runs beside the service or a worker in the same pod, reads that
process's telemetry stream and heartbeat from Redis, and serves them as Prometheus metrics
(/metrics) and as the pod's aggregated health (/health, with Redis, Postgres and the AI
service checked), plus a small dashboard. It serves until SIGTERM or SIGINT, then saves its
position and totals to Redis.
"""


async def serve(
    settings: SidecarSettings, *, host: str = "0.0.0.0", tracing: Tracing | None = None
) -> None:
    """Run until SIGTERM/SIGINT; the cleanup then saves the telemetry checkpoint."""
    install_loop_handler(asyncio.get_running_loop())
    app = create_app(settings, tracing=tracing)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    # JSON refusals and read deadlines, as the service's (shared/httpserver.py).
    http = HttpServer(runner, limits=Limits.from_settings(settings))
    await http.start(host, settings.sidecar_port, reuse_address=True)
    logger.info(
        "{} listening on {}:{} for pod {} (metrics {})",
        PROGRAM,
        host,
        settings.sidecar_port,
        settings.pod,
        "on" if settings.metrics_enabled else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("shutting down")
    await http.close()
    await runner.cleanup()
    logger.info("shutdown complete")


def main(argv: Sequence[str] | None = None) -> None:
    parse_program_args(PROGRAM, DESCRIPTION, SidecarSettings, argv)
    settings = load_settings_or_exit(os.environ, SidecarSettings)
    # Leaving the block flushes Logstash and logs an exception that ends the process.
    with setup_logging(settings, program=PROGRAM):
        tracing = setup_tracing(settings, service_name=PROGRAM)
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(settings, tracing=tracing))
        else:
            uvloop.run(serve(settings, tracing=tracing))
        finally:
            tracing.shutdown()


if __name__ == "__main__":
    main()
