"""What one log call costs the caller, per output of ``shared.logs``.

Run from the repository root, pinned to one core:

    taskset -c 0 .venv/bin/python bench/logcost.py [--calls 20000] [--rounds 7]

Each row sets logging up with ``setup_logging`` (``ENVIRONMENT=production``, ``LOG_LEVEL=info``)
and times ``logger.bind(deviceId=...).info("Metric ingested {}", i)`` in a loop. stdout goes to
/dev/null; files go to a temporary directory; the stand-in Logstash is a child process that
reads and discards (on the other core when there is one, so that its own work is not charged
to the caller). "Wall" is what the calling thread waits; "CPU" is the whole process's CPU per
call, the Logstash shipper thread included. Medians over the rounds. Prints a markdown table.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger

from shared.logs import setup_logging
from shared.settings import ServiceSettings

DISCARDING_LISTENER = """
import os, socket, sys
if os.cpu_count() and os.cpu_count() > 1:
    os.sched_setaffinity(0, {1})
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    while conn.recv(1 << 20):
        pass
    conn.close()
"""


@contextmanager
def discarding_listener() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", DISCARDING_LISTENER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(call: Callable[[int], None], *, calls: int, rounds: int) -> tuple[float, float]:
    """Median (wall µs, CPU µs) per call."""
    for i in range(calls // 10):  # warm-up: files open, Logstash connected or given up
        call(i)
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(calls):
            call(i)
        walls.append((time.perf_counter() - wall) / calls * 1e6)
        cpus.append((time.process_time() - cpu) / calls * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def run(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    rows: list[tuple[str, float, float]] = []
    devnull = open(os.devnull, "w")  # noqa: SIM115 - open for the whole run, closed at the end
    with tempfile.TemporaryDirectory(prefix="logcost-") as tmp, discarding_listener() as port:
        base = ServiceSettings(pod_name="bench", environment="production", log_dir=tmp)

        def row(
            label: str, settings: ServiceSettings, *, level: str = "info", **bind: Any
        ) -> tuple[str, float, float]:
            logs = setup_logging(settings, program="logcost", stream=devnull)
            log = getattr(logger.bind(deviceId="dev-001", **bind), level)
            try:
                wall, cpu = measure(
                    lambda i: log("Metric ingested {}", i), calls=args.calls, rounds=args.rounds
                )
                if logs.logstash is not None:
                    label += f" (dropped {logs.logstash.dropped:,})"
            finally:
                logs.close()
            print(f"{label}: {wall:.2f} µs wall, {cpu:.2f} µs CPU", file=sys.stderr)
            return label, wall, cpu

        files = replace(base, enable_file_logging=True)
        rows.append(row("below LOG_LEVEL (a debug call at info)", base, level="debug"))
        rows.append(row("stdout (/dev/null)", base))
        rows.append(row("stdout + files (application)", files))
        rows.append(
            row("stdout + files, an error line (application + error)", files, level="error")
        )
        rows.append(
            row(
                "stdout + files + Logstash connected",
                replace(files, logstash_host="127.0.0.1", logstash_port=port),
            )
        )
        rows.append(
            row(
                "stdout + files + Logstash away (buffer full, dropping)",
                replace(files, logstash_host="127.0.0.1", logstash_port=closed_port()),
            )
        )
        rows.append(reference_serialize(Path(tmp), args))
    devnull.close()
    # The reference removed every sink; leave loguru as it was on import.
    logger.add(sys.stderr)
    return rows


def reference_serialize(tmp: Path, args: argparse.Namespace) -> tuple[str, float, float]:
    """What bench/peers/conventional.py does: loguru's own file sink, ``serialize=True``."""
    logger.remove()
    handler = logger.add(tmp / "reference.log", serialize=True, level="INFO")
    log = logger.bind(deviceId="dev-001").info
    try:
        wall, cpu = measure(
            lambda i: log("Metric ingested {}", i), calls=args.calls, rounds=args.rounds
        )
    finally:
        logger.remove(handler)
    label = "reference: loguru file sink, serialize=True (the conventional peer)"
    print(f"{label}: {wall:.2f} µs wall, {cpu:.2f} µs CPU", file=sys.stderr)
    return label, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows = run(args)
    print("| output | µs per call (wall) | µs per call (process CPU) |")
    print("| --- | ---: | ---: |")
    for label, wall, cpu in rows:
        print(f"| {label} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
