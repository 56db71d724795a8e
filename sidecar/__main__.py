"""``pulsecal-sidecar``: load settings, set up logging, run until SIGTERM; its cleanup saves
the telemetry checkpoint."""

import os
from collections.abc import Sequence

from shared.cli import parse_program_args
from shared.logs import setup_logging
from shared.runtime.serving import Program, run
from shared.settings import SidecarSettings, load_settings_or_exit

from .app import create_app

__all__ = ("SIDECAR", "main")

PROGRAM = "pulsecal-sidecar"
DESCRIPTION = """
The PulseCal sidecar: runs beside the service or a worker in the same pod, reads that
process's telemetry stream and heartbeat from Redis, and serves them as Prometheus metrics
(/metrics) and as the pod's aggregated health (/health, with Redis, Postgres and the AI
service checked), plus a small dashboard. It serves until SIGTERM or SIGINT, then saves its
position and totals to Redis.
"""


def _port(settings: SidecarSettings) -> int:
    return settings.sidecar_port


SIDECAR = Program(name=PROGRAM, create_app=create_app, port=_port, traced_as=PROGRAM)


def main(argv: Sequence[str] | None = None) -> None:
    parse_program_args(PROGRAM, DESCRIPTION, SidecarSettings, argv)
    settings = load_settings_or_exit(os.environ, SidecarSettings)
    # Leaving the block flushes Logstash and logs an exception that ends the process.
    with setup_logging(settings, program=PROGRAM) as logs:
        run(SIDECAR, settings, logs=logs)


if __name__ == "__main__":
    main()
