"""``pulsecal-service``: load settings, set up logging, run the app until SIGTERM."""

import os
from collections.abc import Sequence

from shared.cli import parse_program_args
from shared.logs import setup_logging
from shared.runtime.serving import run
from shared.settings import ServiceSettings, load_settings_or_exit
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


def main(argv: Sequence[str] | None = None) -> None:
    parse_program_args(PROGRAM, DESCRIPTION, ServiceSettings, argv)
    settings = load_settings_or_exit(os.environ, ServiceSettings)
    # Leaving the block flushes Logstash and logs an exception that ends the process.
    with setup_logging(settings, program=PROGRAM) as logs:
        run(SERVICE, settings, logs=logs)


if __name__ == "__main__":
    main()
