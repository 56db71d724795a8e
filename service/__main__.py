"""``pulsecal-service``: load settings, set up logging, run the app until SIGTERM."""

import os
from collections.abc import Sequence

from shared.cli import LOGGING_ENV, TRACING_ENV, parse_program_args
from shared.logs import setup_logging
from shared.runtime.serving import run
from shared.settings import load_settings_or_exit
from shared.telemetry import SERVICE_PROGRAM

from .server import SERVICE

__all__ = ("main",)

PROGRAM = SERVICE_PROGRAM
DESCRIPTION = """
The PulseCal ingestion service: devices post PPG batches over HTTP or stream them over a
WebSocket, authenticated by their tokens (cached from Postgres); a batch is acknowledged once
it is in the Redis readings stream the worker persists. It also answers the health probes and
the operators' alerts API, and writes per-request telemetry for its sidecar. It serves until
SIGTERM or SIGINT, then drains in-flight requests.
"""
ENV_VARS = {
    "PORT": "HTTP port, on all interfaces",
    "REDIS_URL": "readings stream, rate limits, telemetry, heartbeat",
    "REDIS_KEY_PREFIX": "prefix of every Redis key",
    "DATABASE_URL": "Postgres: device tokens and the alerts API",
    "AI_SERVICE_URL": "analysis service, checked by /health when set",
    "POD_NAME": "names this pod's telemetry and heartbeat; the host name when empty",
    "ADMIN_TOKEN": "bearer token of the operators' GET /alerts",
    "SHUTDOWN_TIMEOUT": "seconds in-flight requests get on SIGTERM",
    "HTTP_HEADER_TIMEOUT": "seconds a request head gets from its first byte (then 408)",
    "HTTP_BODY_TIMEOUT": "seconds a request body gets once its head is in (then 408)",
    "HTTP_KEEPALIVE_TIMEOUT": "seconds an idle keep-alive connection is kept open",
    "WS_HANDSHAKE_TIMEOUT": "seconds a device gets to answer the close frame on shutdown",
    "HEALTH_DETAIL_TOKEN": "bearer token that sees health details (default: METRICS_TOKEN)",
    **LOGGING_ENV,
    **TRACING_ENV,
}


def main(argv: Sequence[str] | None = None) -> None:
    parse_program_args(PROGRAM, DESCRIPTION, ENV_VARS, argv)
    settings = load_settings_or_exit(os.environ, PROGRAM)
    # Leaving the block flushes Logstash and logs an exception that ends the process.
    with setup_logging(settings, program=PROGRAM) as logs:
        run(SERVICE, settings, logs=logs)


if __name__ == "__main__":
    main()
