"""Helpers of the sidecar tests: the sidecar and Prometheus as real processes, telemetry.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package, Chromium from
``chromium`` (both installed by ``.ci/run``); the tests fail, never skip, without them.
"""

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from shared import telemetry
from shared.keys import Keys
from shared.telemetry import BATCH_FIELD, Record, ServiceHeartbeat, TelemetryBatch, encode_batch
from tests.support.procs import _SETTINGS_ENV, READY_DEADLINE, _Process, free_port

__all__ = (
    "PrometheusServer",
    "SidecarProcess",
    "heartbeat",
    "http_record",
    "promtool_check",
    "scrape",
    "series_values",
    "total",
    "xadd_batch",
)

SIDECAR_BIN = Path(sys.executable).with_name("pulsecal-sidecar")
PROMETHEUS_BIN = "/usr/bin/prometheus"
PROMTOOL_BIN = "/usr/bin/promtool"
CHROMIUM_BIN = "/usr/bin/chromium"


def http_record(
    route: str = "/ingestion/ppg",
    method: str = "POST",
    status: int = 202,
    duration_us: int = 300,
    *,
    size: int = 100,
    samples: int = 4,
    trace_id: str | None = None,
) -> Record:
    return telemetry.http_record(route, method, status, duration_us, size, samples, trace_id)


async def xadd_batch(
    redis: Redis,
    keys: Keys,
    pod: str,
    records: Sequence[Record],
    *,
    boot_id: str = "boot-1",
    dropped_total: int = 0,
    sent_ms: int | None = None,
    maxlen: int | None = None,
) -> bytes:
    batch = TelemetryBatch(
        boot_id,
        time.time_ns() // 1_000_000 if sent_ms is None else sent_ms,
        dropped_total,
        list(records),
    )
    entry_id = await redis.xadd(
        keys.telemetry(pod), {BATCH_FIELD: encode_batch(batch)}, maxlen=maxlen, approximate=False
    )
    return entry_id if isinstance(entry_id, bytes) else entry_id.encode()


def heartbeat(pod: str, *, age_s: float = 0.0, ready: bool = True, ws: int = 3) -> ServiceHeartbeat:
    now_ms = time.time_ns() // 1_000_000
    return ServiceHeartbeat(
        pod=pod,
        boot_id="b" * 32,
        pid=4242,
        version="0.1.0",
        started_ms=now_ms - 60_000,
        sent_ms=now_ms - int(age_s * 1000),
        ready=ready,
        draining=False,
        rss_bytes=80 << 20,
        heap_bytes=40 << 20,
        loop_lag_ms=1.5,
        http_connections=5,
        ws_connections=ws,
        pending_writes=0,
        writes_ok=10,
        writes_duplicate=1,
        writes_failed=0,
        write_batches=7,
        redis_ok=True,
        backlog=12,
        backlog_exceeded=False,
        telemetry_dropped=0,
        tokens_loaded=2,
        db_pool={"size": 2, "available": 1, "waiting": 0},
    )


async def promtool_check(text: str) -> tuple[int, str]:
    """``promtool check metrics`` on an exposition: (exit code, what it said)."""
    process = await asyncio.create_subprocess_exec(
        PROMTOOL_BIN,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate(text.encode())
    assert process.returncode is not None
    return process.returncode, output.decode()


def series_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text-format exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(text: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over the series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        value
        for (sample, sample_labels), value in series_values(text).items()
        if sample == name and wanted <= sample_labels
    )


async def scrape(url: str, *, token: str | None = None, accept: str | None = None) -> str:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if accept is not None:
        headers["Accept"] = accept
    async with (
        ClientSession(timeout=ClientTimeout(total=10)) as session,
        session.get(f"{url}/metrics", headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.text()


class SidecarProcess(_Process):
    """``pulsecal-sidecar`` on a port of its own, configured only by the given variables."""

    def __init__(
        self, config: Mapping[str, str], *, log_dir: Path, port: int | None = None
    ) -> None:
        self.port = free_port() if port is None else port
        env = {name: value for name, value in os.environ.items() if name not in _SETTINGS_ENV}
        env.update({"LOG_DIR": str(log_dir), **config, "SIDECAR_PORT": str(self.port)})
        super().__init__([str(SIDECAR_BIN)], env=env, log_dir=log_dir)
        self.url = f"http://127.0.0.1:{self.port}"

    async def wait_live(self) -> None:
        await self.wait_answering(f"{self.url}/health/liveness")


class PrometheusServer(_Process):
    """A Prometheus of the test's own scraping ``targets`` every ``interval`` (1 s).

    ``rule_files`` are loaded and evaluated every ``interval`` too; ``job`` and ``labels``
    label every target, as ops/prometheus.yml labels a pod's sidecar.
    """

    def __init__(
        self,
        directory: Path,
        *,
        targets: Iterable[str],
        bearer_token: str | None = None,
        interval: str = "1s",
        rule_files: Iterable[Path] = (),
        job: str = "pulsecal-sidecar",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        auth = (
            ""
            if bearer_token is None
            else f"    authorization:\n      credentials: {bearer_token}\n"
        )
        rules = "".join(f"  - {json.dumps(str(path))}\n" for path in rule_files)
        target_labels = (
            "" if not labels else f"        labels: {json.dumps(dict(labels), sort_keys=True)}\n"
        )
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  scrape_timeout: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n"
            f"  - job_name: {job}\n"
            "    metrics_path: /metrics\n"
            f"{auth}"
            "    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n"
            f"{target_labels}"
        )
        super().__init__(
            [
                PROMETHEUS_BIN,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
                "--log.level=warn",
            ],
            env=os.environ,
            log_dir=directory,
        )

    async def wait_ready(self) -> None:
        async with (
            ClientSession(timeout=ClientTimeout(total=1)) as session,
            asyncio.timeout(READY_DEADLINE * 2),
        ):
            while True:
                if self.returncode is not None:
                    raise RuntimeError(f"prometheus exited ({self.returncode}):\n{self.output()}")
                try:
                    async with session.get(f"{self.url}/-/ready") as response:
                        if response.status == 200:
                            return
                except (ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)

    async def api(self, path: str, **params: str) -> object:
        async with (
            ClientSession(timeout=ClientTimeout(total=5)) as session,
            session.get(f"{self.url}/api/v1/{path}", params=params) as response,
        ):
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query_value(self, expr: str) -> float | None:
        """The value of an instant query returning one series (None when it returns none)."""
        data = await self.api("query", query=expr)
        assert isinstance(data, dict)
        result = data["result"]
        if not result:
            return None
        return float(result[0]["value"][1])
