"""``pulsecal-sidecar``: load settings, set up logging, serve until SIGTERM, save and exit."""

import asyncio
import os
import signal

from aiohttp import web
from loguru import logger

from shared.logs import setup_logging
from shared.settings import Settings, load_settings_or_exit

from .app import create_app

__all__ = ("main", "serve")

PROGRAM = "pulsecal-sidecar"


async def serve(settings: Settings, *, host: str = "0.0.0.0") -> None:
    """Run until SIGTERM/SIGINT; the cleanup then saves the telemetry checkpoint."""
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, settings.sidecar_port, reuse_address=True)
    await site.start()
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
    await runner.cleanup()
    logger.info("shutdown complete")


def main() -> None:
    settings = load_settings_or_exit(os.environ, PROGRAM)
    setup_logging(settings, program=PROGRAM)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
