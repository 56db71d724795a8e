"""Sidecar benchmark: aggregation throughput, request-to-/metrics latency, render time.

Run from the repository root, pinned to core 0 (Redis and the load side move to core 1)::

    taskset -c 0 .venv/bin/python bench/sidecar.py [--records 400000] [--rounds 5] [--quick]

Every figure comes with a baseline measured in the same run:

1. Aggregation on one core: decoding the same msgpack batches without aggregating them is the
   baseline; decode + ``Aggregator.add_batch`` is the sidecar; decode + prometheus_client
   (cached children: ``observe`` + ``inc``) is the conventional way, for comparison.
2. The consumer through Redis: ``TelemetryConsumer.read_once`` (MULTI of XINFO + XREAD,
   redis-py with hiredis) on a pre-filled stream, against the in-memory figure above.
3. Request -> visible in ``/metrics``: a real ``pulsecal-sidecar`` (core 0) while a writer
   (core 1) XADDs telemetry like the service does (one entry per 0.2 s flush) at a given
   record rate; marker records are timed from the moment the "request" is recorded in the
   writer's buffer to the first scrape (every 25 ms) that shows them.
4. ``/metrics`` with 10 000 histogram series: the sidecar's writer against prometheus_client
   rendering the same state through a custom collector (``generate_latest``), plus the real
   endpoint's time (render + checkpoint save) on a sidecar holding that many series.

The record mix (``make_records``): 90 % HTTP records over 6 routes (mostly POST
/ingestion/ppg 202; 422, 401, 404, 429, 503 among them), 8 % WebSocket messages, 2 %
WebSocket opens/closes; durations log-normal around 400 µs; 1 % carry a trace id.
"""

# ruff: noqa: E402 - the imports follow the sys.path fix-up below
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Ahead of bench/ (the script's own directory), where this file would shadow the package.
sys.path.insert(0, str(ROOT))

import aiohttp
import redis.asyncio
from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.keys import Keys
from shared.telemetry import BATCH_FIELD, Record, TelemetryBatch, decode_batch, encode_batch
from sidecar.aggregate import DURATION_BUCKETS_S, Aggregator
from sidecar.consumer import TelemetryConsumer
from sidecar.exposition import render
from sidecar.metrics import MetricsView

SIDECAR_CORE = 0
LOAD_CORE = 1
BATCH_RECORDS = 500  # one service flush (0.2 s) at 2.5k requests/s
FLUSH_INTERVAL = 0.2
POLL_INTERVAL = 0.025
MARKER_ROUTE = "/bench/marker"

_ROUTES = [
    ("/ingestion/ppg", "POST", 202, 80),
    ("/ingestion/ppg", "POST", 422, 4),
    ("/ingestion/ppg", "POST", 401, 2),
    ("/ingestion/ppg", "POST", 429, 1),
    ("/ingestion/ppg", "POST", 503, 1),
    ("unmatched", "GET", 404, 1),
    ("/health/readiness", "GET", 200, 1),
]


def make_records(count: int, *, seed: int = 7) -> list[Record]:
    rng = random.Random(seed)
    weights = [w for *_, w in _ROUTES]
    records: list[Record] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.90:
            route, method, status, _ = rng.choices(_ROUTES, weights)[0]
            duration = int(rng.lognormvariate(6.0, 0.6))  # ~400 µs median
            trace = f"{rng.getrandbits(128):032x}" if rng.random() < 0.01 else None
            samples = 50 if status == 202 else 0
            records.append((0, route, method, status, duration, 1100, samples, trace))
        elif roll < 0.98:
            records.append(
                (1, "/ingestion/ws", "WS", 202, int(rng.lognormvariate(5, 0.5)), 1100, 50, None)
            )
        elif roll < 0.99:
            records.append((2, "/ingestion/ws", "GET", 101, 0, 0, 0, None))
        else:
            records.append((3, "/ingestion/ws", "GET", 1000, 0, 0, 0, None))
    return records


def make_blobs(records: list[Record], batch: int = BATCH_RECORDS) -> list[bytes]:
    now_ms = time.time_ns() // 1_000_000
    return [
        encode_batch(TelemetryBatch("bench-boot", now_ms, 0, records[i : i + batch]))
        for i in range(0, len(records), batch)
    ]


def pin(core: int) -> None:
    os.sched_setaffinity(0, {core})


def best_of(rounds: int, run: Callable[[], float]) -> float:
    """The shortest of ``rounds`` runs: on a shared machine, the one least disturbed."""
    return min(run() for _ in range(rounds))


# ------------------------------------------------------------------------- 1. in memory


def decode_only(blobs: list[bytes]) -> float:
    started = time.perf_counter()
    for data in blobs:
        decode_batch(data)
    return time.perf_counter() - started


def decode_and_aggregate(blobs: list[bytes]) -> float:
    aggregator = Aggregator(max_series=2000)
    started = time.perf_counter()
    for data in blobs:
        aggregator.add_batch(decode_batch(data))
    return time.perf_counter() - started


def decode_and_prometheus_client(blobs: list[bytes]) -> float:
    registry = CollectorRegistry()
    histogram = Histogram(
        "http_request_duration_seconds",
        "d",
        ["method", "route", "status"],
        buckets=DURATION_BUCKETS_S,
        registry=registry,
    )
    ingested = Counter("metrics_ingested", "m", ["transport"], registry=registry)
    ws = Counter("websocket_messages", "w", ["status"], registry=registry)
    children: dict[tuple[str, str, int], Any] = {}
    http_samples = ingested.labels("http")
    started = time.perf_counter()
    for data in blobs:
        for kind, route, method, status, duration, _, samples, _ in decode_batch(data).records:
            if kind == 0:
                key = (route, method, status)
                child = children.get(key)
                if child is None:
                    child = children[key] = histogram.labels(method, route, str(status))
                child.observe(duration / 1e6)
                if samples:
                    http_samples.inc(samples)
            elif kind == 1:
                ws.labels(str(status)).inc()
    return time.perf_counter() - started


# --------------------------------------------------------------------- processes, redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            *("taskset", "-c", str(LOAD_CORE), "redis-server", "--port", str(port)),
            *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def sidecar_process(redis_url: str, log: Path, **env: str) -> Iterator[str]:
    port = free_port()
    binary = Path(sys.executable).with_name("pulsecal-sidecar")
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["taskset", "-c", str(SIDECAR_CORE), str(binary)],
            env={
                **os.environ,
                "REDIS_URL": redis_url,
                "REDIS_KEY_PREFIX": "bench:",
                "POD_NAME": "bench",
                "SIDECAR_PORT": str(port),
                "LOG_LEVEL": "warning",
                "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
                **env,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(15)


# ------------------------------------------------------------------ 2. through Redis


async def through_redis(redis_url: str, blobs: list[bytes], rounds: int) -> float:
    client = redis.asyncio.Redis.from_url(redis_url)
    keys = Keys("bench:")
    durations = []
    try:
        for n in range(rounds):
            stream = keys.telemetry(f"through-{n}")
            pipe = client.pipeline(transaction=False)
            for data in blobs:
                pipe.xadd(stream, {BATCH_FIELD: data})
            await pipe.execute()
            consumer = TelemetryConsumer(
                client,
                stream=stream,
                state_key=keys.sidecar_state(f"through-{n}"),
                max_series=2000,
                read_count=200,
                block_ms=100,
                checkpoint_interval=1.0,
                state_ttl=60,
            )
            await consumer.load()
            started = time.perf_counter()
            while await consumer.read_once():
                pass
            durations.append(time.perf_counter() - started)
            assert consumer.aggregator is not None
            assert consumer.aggregator.entries == len(blobs)
            await client.delete(stream)
    finally:
        await client.aclose()
    return min(durations)


# ------------------------------------------------------------------ 3. visibility


_MARKER_LINE = re.compile(
    rb'^http_requests_total\{method="GET",route="'
    + MARKER_ROUTE.encode()
    + rb'",status="200"\} (\d+)',
    re.MULTILINE,
)


async def visibility(redis_url: str, rate: int, markers: int, log: Path) -> dict[str, float]:
    """Seconds from a request being recorded to a scrape that shows it, at ``rate`` rec/s."""
    pin(LOAD_CORE)
    client = redis.asyncio.Redis.from_url(redis_url)
    keys = Keys("bench:")
    stream = keys.telemetry("bench")
    await client.delete(stream, keys.sidecar_state("bench"))
    filler = make_records(max(1, int(rate * FLUSH_INTERVAL)), seed=rate)
    latencies: list[float] = []
    from_xadd: list[float] = []
    with sidecar_process(redis_url, log, SIDECAR_CHECKPOINT_INTERVAL="1") as url:
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(1.0)
            pending: list[float] = []  # when each marker was recorded, oldest first
            xadded: dict[int, float] = {}
            sent_markers = 0
            stop = asyncio.Event()

            async def writer() -> None:
                nonlocal sent_markers
                buffer: list[Record] = []
                next_flush = time.perf_counter()
                next_marker = next_flush + 1.0
                while not stop.is_set():
                    now = time.perf_counter()
                    if now >= next_marker and sent_markers < markers:
                        buffer.append((0, MARKER_ROUTE, "GET", 200, 300, 0, 0, None))
                        pending.append(time.perf_counter())
                        sent_markers += 1
                        next_marker = now + 0.35 + random.random() * 0.2
                    if now >= next_flush:
                        batch = TelemetryBatch(
                            "boot", time.time_ns() // 1_000_000, 0, buffer + filler
                        )
                        buffer = []
                        await client.xadd(stream, {BATCH_FIELD: encode_batch(batch)}, maxlen=10_000)
                        xadded[sent_markers] = time.perf_counter()
                        next_flush += FLUSH_INTERVAL
                    await asyncio.sleep(0.005)

            async def poller() -> None:
                seen = 0
                while seen < markers:
                    async with http.get(f"{url}/metrics") as response:
                        body = await response.read()
                    match = _MARKER_LINE.search(body)
                    count = int(match.group(1)) if match else 0
                    now = time.perf_counter()
                    while seen < count:
                        latencies.append(now - pending[seen])
                        flushed = min(t for n, t in xadded.items() if n > seen)
                        from_xadd.append(now - flushed)
                        seen += 1
                    await asyncio.sleep(POLL_INTERVAL)
                stop.set()

            await asyncio.wait_for(asyncio.gather(writer(), poller()), timeout=markers * 2 + 30)
    await client.aclose()
    pin(SIDECAR_CORE)
    latencies.sort()
    return {
        "p50": statistics.median(latencies),
        "p95": latencies[max(0, int(len(latencies) * 0.95) - 1)],
        "max": latencies[-1],
        "xadd_p50": statistics.median(from_xadd),
        "xadd_max": max(from_xadd),
    }


# ------------------------------------------------------------------ 4. render


def wide_aggregator(series: int) -> Aggregator:
    aggregator = Aggregator(max_series=series)
    statuses = (200, 202, 404, 422, 503)
    rng = random.Random(3)
    records: list[Record] = []
    for i in range(series):
        route = f"/api/v1/resource-{i // len(statuses)}/{{id}}"
        status = statuses[i % len(statuses)]
        for _ in range(8):
            trace = f"{rng.getrandbits(128):032x}" if rng.random() < 0.05 else None
            records.append((0, route, "GET", status, int(rng.lognormvariate(7, 1.5)), 10, 0, trace))
    for i in range(0, len(records), 5000):
        aggregator.add_batch(
            TelemetryBatch("b", time.time_ns() // 1_000_000, 0, records[i : i + 5000])
        )
    assert len(aggregator.http) == series
    return aggregator


class _Collector(Collector):
    """prometheus_client's way: a custom collector building families on every scrape."""

    def __init__(self, aggregator: Aggregator) -> None:
        self._aggregator = aggregator

    def collect(self) -> Iterator[Metric]:
        duration = HistogramMetricFamily(
            "http_request_duration_seconds", "d", labels=["method", "route", "status"]
        )
        requests = CounterMetricFamily("http_requests", "r", labels=["method", "route", "status"])
        les = [str(b) for b in DURATION_BUCKETS_S] + ["+Inf"]
        for (route, method, status), counts, sum_us in self._aggregator.http_series():
            labels = [method, route, str(status)]
            cumulative, buckets = 0, []
            for le, count in zip(les, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            duration.add_metric(labels, buckets, sum_us / 1e6)
            requests.add_metric(labels, cumulative)
        yield duration
        yield requests


def render_times(series: int, rounds: int) -> dict[str, float]:
    aggregator = wide_aggregator(series)
    view = MetricsView()

    # Never connected: the families only read the consumer's counters.
    consumer = TelemetryConsumer(
        redis.asyncio.Redis(),
        stream="unused",
        state_key="unused",
        max_series=series,
        read_count=1,
        block_ms=1,
        checkpoint_interval=1,
        state_ttl=60,
    )

    def ours(openmetrics: bool) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            families = view.families(
                aggregator,
                consumer,
                None,
                heartbeat_age_s=None,
                max_series=series,
            )
            render(families, openmetrics=openmetrics)
            return time.perf_counter() - started

        return run

    registry = CollectorRegistry()
    registry.register(_Collector(aggregator))

    def theirs() -> float:
        started = time.perf_counter()
        generate_latest(registry)
        return time.perf_counter() - started

    def save() -> float:
        started = time.perf_counter()
        aggregator.to_bytes()
        return time.perf_counter() - started

    ours(False)()  # warm the label cache, as every scrape after the first finds it
    families = view.families(aggregator, consumer, None, heartbeat_age_s=None, max_series=series)
    return {
        "text": best_of(rounds, ours(False)),
        "openmetrics": best_of(rounds, ours(True)),
        "prometheus_client": best_of(rounds, theirs),
        "state_encode": best_of(rounds, save),
        "text_bytes": len(render(families, openmetrics=False)),
        "state_bytes": len(aggregator.to_bytes()),
    }


async def endpoint_time(redis_url: str, series: int, rounds: int, log: Path) -> float:
    """GET /metrics on a real sidecar holding ``series`` histogram series (render + save)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    keys = Keys("bench:")
    await client.delete(keys.telemetry("bench"), keys.sidecar_state("bench"))
    aggregator_records: list[Record] = []
    for i in range(series):
        aggregator_records.append(
            (0, f"/api/v1/resource-{i}/{{id}}", "GET", 200, 500 + i, 10, 0, None)
        )
    for i in range(0, series, 2000):
        batch = TelemetryBatch(
            "b", time.time_ns() // 1_000_000, 0, aggregator_records[i : i + 2000]
        )
        await client.xadd(keys.telemetry("bench"), {BATCH_FIELD: encode_batch(batch)})
    times = []
    with sidecar_process(redis_url, log, METRICS_MAX_SERIES=str(series)) as url:
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(1.5)
            for n in range(rounds + 1):
                started = time.perf_counter()
                async with http.get(f"{url}/metrics") as response:
                    body = await response.read()
                elapsed = time.perf_counter() - started
                if n:  # the first also fills the label cache
                    times.append(elapsed)
                assert body.count(b"\nhttp_requests_total{") == series, "not all series consumed"
                # Something new each time, so every scrape also writes the checkpoint.
                await client.xadd(keys.telemetry("bench"), {BATCH_FIELD: encode_batch(batch)})
                await asyncio.sleep(0.3)
    await client.aclose()
    return min(times)


# ----------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--markers", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="fewer records, rounds, markers")
    args = parser.parse_args()
    if args.quick:
        args.records, args.rounds, args.markers = 100_000, 1, 6
    if shutil.which("redis-server") is None or shutil.which("taskset") is None:
        sys.exit("needs redis-server and taskset on PATH")
    pin(SIDECAR_CORE)
    logger.remove()  # the consumer's "no saved state" notes are not part of the report
    import uvloop

    records = make_records(args.records)
    blobs = make_blobs(records)
    n = len(records)
    decode_s = best_of(args.rounds, lambda: decode_only(blobs))
    aggregate_s = best_of(args.rounds, lambda: decode_and_aggregate(blobs))
    client_s = best_of(args.rounds, lambda: decode_and_prometheus_client(blobs))

    with tempfile.TemporaryDirectory(prefix="pulsecal-bench-sidecar-") as tmp:
        tmp_dir = Path(tmp)
        with redis_server(tmp_dir) as redis_url:
            redis_s = uvloop.run(through_redis(redis_url, blobs, args.rounds))
            visible = {
                rate: uvloop.run(
                    visibility(redis_url, rate, args.markers, tmp_dir / f"vis-{rate}.log")
                )
                for rate in (15_000, 150_000)
            }
            endpoint_s = uvloop.run(
                endpoint_time(redis_url, args.series, args.rounds, tmp_dir / "endpoint.log")
            )
        renders = render_times(args.series, args.rounds)

    def rate(seconds: float) -> str:
        return f"{n / seconds:,.0f}"

    print(f"\n## Sidecar ({n:,} records in batches of {BATCH_RECORDS}, best of {args.rounds})\n")
    print("| path (core 0) | records/s | µs/record | vs decode only |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in (
        ("msgpack decode only (baseline)", decode_s),
        ("decode + Aggregator (sidecar)", aggregate_s),
        ("decode + prometheus_client, cached children", client_s),
        ("TelemetryConsumer through Redis (XINFO+XREAD in MULTI)", redis_s),
    ):
        print(f"| {name} | {rate(seconds)} | {seconds / n * 1e6:.2f} | {decode_s / seconds:.2f} |")
    print(
        f"\nAggregation alone: {(aggregate_s - decode_s) / n * 1e6:.2f} µs/record; "
        f"sidecar vs prometheus_client: {client_s / aggregate_s:.2f}x."
    )
    print(
        "\n| load (records/s) | recorded -> visible p50 | p95 | max | XADD -> visible p50 | max |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for load, v in visible.items():
        print(
            f"| {load:,} | "
            + " | ".join(
                f"{v[k] * 1000:.0f} ms" for k in ("p50", "p95", "max", "xadd_p50", "xadd_max")
            )
            + " |"
        )
    print(f"\n| /metrics, {args.series:,} histogram series | ms | vs prometheus_client |")
    print("| --- | ---: | ---: |")
    base = renders["prometheus_client"]
    for name, seconds in (
        ("prometheus_client custom collector, generate_latest (baseline)", base),
        ("sidecar text 0.0.4 (families + render)", renders["text"]),
        ("sidecar OpenMetrics with exemplars", renders["openmetrics"]),
        ("checkpoint encode (msgpack of the state)", renders["state_encode"]),
        ("GET /metrics on a running sidecar (render + checkpoint SET)", endpoint_s),
    ):
        print(f"| {name} | {seconds * 1000:,.1f} | {seconds / base:.2f} |")
    print(
        f"\nText body {renders['text_bytes'] / 1e6:.1f} MB, saved state"
        f" {renders['state_bytes'] / 1e6:.2f} MB. Python {sys.version.split()[0]},"
        f" {os.cpu_count()} cores."
    )


if __name__ == "__main__":
    main()
