"""Helpers of the worker tests: readings entries, the worker and Postgres as real processes.

Entries are written in the service's exact format (``shared.readings.encode_write``: one
entry per write, carrying the batches of that write as the devices sent them, and when they
were received), grouped as the service groups them (up to ``WRITE_MAX_BATCH`` per write);
or, for the upgrade's sake, one batch per entry in the format older services wrote
(``shared.readings.encode_entry``).
"""

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec
import psycopg
from redis.asyncio import Redis

from shared.keys import Keys
from shared.readings import PERSIST_GROUP, encode_entry, encode_write
from shared.settings import ProgramSettings, WorkerSettings, variables
from tests.support.env import REDIS_URL
from tests.support.procs import _SETTINGS_ENV, _Process, free_port
from tests.support.settings import for_program

__all__ = (
    "WRITE_MAX_BATCH",
    "PostgresCluster",
    "WorkerProcess",
    "add_bodies",
    "add_readings",
    "eventually",
    "reading",
    "stored_counts",
    "worker_settings",
)

WORKER_BIN = Path(sys.executable).with_name("pulsecal-worker")
BASE_TS = 1_764_000_000_000  # 2025-11-24T16:00Z: older than any partition, so the default
# The most batches the service's write (so one readings entry) carries, by default.
WRITE_MAX_BATCH: int = {v.name: v.default for v in variables()}["WRITE_MAX_BATCH"]


def worker_settings(settings: ProgramSettings, **overrides: Any) -> WorkerSettings:
    """The worker of the test's prefix and schema, polling and claiming quickly."""
    values: dict[str, Any] = {
        "worker_block_ms": 100,
        "worker_claim_idle": 0.5,
        "worker_trim_interval": 0.1,
        "worker_retry_max": 0.2,
        "alert_silence_after": 0.0,
        # Each reading evaluated as it arrives; the tests of lateness set their own.
        "alert_lateness": 0.0,
        "analysis_grace": 0.0,
        "analysis_backoff": 0.01,
        "analysis_backoff_max": 0.05,
    }
    values.update(overrides)
    return for_program(WorkerSettings, settings, **values)


def reading(
    device_id: str,
    seq: int,
    *,
    ts: int | None = None,
    hr: float | None = 72.0,
    spo2: float | None = 98.0,
    ppg: Sequence[float] = (0.5, 0.6, 0.7, 0.65),
    rate_hz: float = 50.0,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": device_id,
        "seq": seq,
        "ts": BASE_TS + seq * 1000 if ts is None else ts,
        "rate_hz": rate_hz,
        "ppg": list(ppg),
    }
    if hr is not None:
        body["hr"] = hr
    if spo2 is not None:
        body["spo2"] = spo2
    return body


async def add_readings(
    redis: Redis,
    keys: Keys,
    batches: Sequence[Mapping[str, Any]],
    *,
    per_entry: int = WRITE_MAX_BATCH,
    one_batch_format: bool = False,
) -> list[bytes]:
    """Append batches to the readings stream as the service does (one pipeline); the ids
    of the entries added."""
    return await add_bodies(
        redis,
        keys,
        [msgspec.json.encode(batch) for batch in batches],
        per_entry=per_entry,
        one_batch_format=one_batch_format,
    )


async def add_bodies(
    redis: Redis,
    keys: Keys,
    bodies: Sequence[bytes],
    *,
    per_entry: int = WRITE_MAX_BATCH,
    one_batch_format: bool = False,
    traceparents: Sequence[bytes | None] | None = None,
) -> list[bytes]:
    """Append these bodies as they are (valid batches or not), received now: ``per_entry``
    to an entry, in order, or each in an entry of its own in the one-batch format. The ids
    of the entries added."""
    received_ms = time.time_ns() // 1_000_000
    traces = list(traceparents) if traceparents is not None else [None] * len(bodies)
    pairs = list(zip(bodies, traces, strict=True))
    if one_batch_format:
        entries = [encode_entry(body, received_ms, trace) for body, trace in pairs]
    else:
        entries = [
            encode_write(received_ms, pairs[start : start + per_entry])
            for start in range(0, len(pairs), per_entry)
        ]
    async with redis.pipeline(transaction=False) as pipe:
        for fields in entries:
            # redis-py's field type is a dict of every encodable type (invariant).
            added: dict[Any, Any] = fields
            pipe.xadd(keys.readings, added)
        return cast(list[bytes], await pipe.execute())


async def stored_counts(database_url: str, device_ids: Sequence[str]) -> dict[tuple[str, int], int]:
    """How many times each (device, seq) of these devices is in ``readings``."""
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=5) as conn:
        cur = await conn.execute(
            "SELECT device_id, seq, count(*) FROM readings WHERE device_id = ANY(%s)"
            " GROUP BY device_id, seq",
            (list(device_ids),),
        )
        return {(d, s): n for d, s, n in await cur.fetchall()}


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 10.0, every: float = 0.05
) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(every)


class WorkerProcess(_Process):
    """``pulsecal-worker`` with its probes on a free port, configured only by ``config``."""

    def __init__(self, config: Mapping[str, str], *, log_dir: Path) -> None:
        self.port = free_port()
        env = {name: value for name, value in os.environ.items() if name not in _SETTINGS_ENV}
        env.update({"LOG_DIR": str(log_dir), **config, "WORKER_PORT": str(self.port)})
        super().__init__([str(WORKER_BIN)], env=env, log_dir=log_dir)
        self.url = f"http://127.0.0.1:{self.port}"

    def logged(self, level: str) -> list[str]:
        return [line for line in self.output().splitlines() if f'"level":"{level}"' in line]

    async def wait_started(self) -> None:
        await self.wait_answering(f"{self.url}/health/startup")


class PostgresCluster:
    """A throwaway Postgres of the test's own (initdb + pg_ctl) on a free port.

    As root the server runs as the ``postgres`` user, as Postgres insists.
    """

    def __init__(self, directory: Path) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        initdb = shutil.which("initdb") or (str(found[-1]) if found else None)
        if initdb is None:
            raise RuntimeError("initdb not found (apt-get install postgresql)")
        self._bin = Path(initdb).parent
        self._dir = directory
        self._data = directory / "data"
        self._as_user: list[str] = []
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres")
            # The server must reach its directory through the test's temporary directories.
            temp_root = Path(tempfile.gettempdir()).resolve()
            for parent in directory.resolve().parents:
                if parent == temp_root or temp_root not in parent.parents:
                    break
                parent.chmod(parent.stat().st_mode | 0o011)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str) -> None:
        subprocess.run(
            [*self._as_user, *argv], check=True, capture_output=True, cwd=self._dir, timeout=60
        )

    def init(self) -> None:
        self._run(
            str(self._bin / "initdb"),
            *("-D", str(self._data), "-U", "postgres", "-A", "trust", "--no-sync"),
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self._dir} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off"
        )
        self._run(
            str(self._bin / "pg_ctl"),
            *("-D", str(self._data), "-l", str(self._dir / "server.log")),
            *("-w", "-t", "30", "-o", options, "start"),
        )

    def stop(self, mode: str = "fast") -> None:
        if not (self._data / "postmaster.pid").exists():
            return
        self._run(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster (its children stop by themselves); for cleanup only."""
        pid_file = self._data / "postmaster.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


def worker_config(keys: Keys, database_url: str, pod: str) -> dict[str, str]:
    return {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": database_url,
        "REDIS_KEY_PREFIX": keys.prefix,
        "POD_NAME": pod,
        "WORKER_BATCH": "200",
        "WORKER_BLOCK_MS": "100",
        "WORKER_CLAIM_IDLE": "1",
        "WORKER_RETRY_MAX": "0.5",
        "WORKER_TRIM_INTERVAL": "0.2",
        "HEALTH_CHECK_INTERVAL": "0.2",
        "HEALTH_CHECK_TIMEOUT": "1000",
        "ALERT_SILENCE_AFTER": "0",
        "SHUTDOWN_TIMEOUT": "3",
    }


async def group_state(redis: Redis, keys: Keys) -> tuple[int, int]:
    """(lag, pending) of the persist group."""
    for group in await redis.xinfo_groups(keys.readings):
        if group["name"] == PERSIST_GROUP.encode():
            return int(group["lag"] if group["lag"] is not None else -1), int(group["pending"])
    return -1, -1


async def caught_up(redis: Redis, keys: Keys) -> bool:
    return await group_state(redis, keys) == (0, 0)
