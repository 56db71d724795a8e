"""What the sidecar's dependency metrics cost one scrape: time and Redis commands.

Run from the repository root, pinned to core 0::

    taskset -c 0 .venv/bin/python bench/depmetrics.py [--rounds 200] [--partitions 1 12 128]

For each partition count P, the readings streams of one layout are filled (``--entries`` per
partition, a ``persist`` group with some delivered and unacknowledged, a few dead letters),
then ``DependencyCollector.collect`` (cache off: every call collects) runs ``--rounds`` times
against the local Redis (``REDIS_URL``, default 127.0.0.1:6379), each rendered to the text
exposition as ``/metrics`` would. Printed as a markdown table: the commands one collection
sends (``total_commands_processed`` of ``INFO stats`` before and after, less the INFO that
reads it), Redis's CPU per collection (``used_cpu_sys + used_cpu_user``), and the
collection's and the rendering's wall time, median and p99. Keys carry a prefix of their own
and are deleted afterwards.
"""

# ruff: noqa: E402 - the imports follow the sys.path fix-up below
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio

from shared.keys import Keys
from shared.readings import PERSIST_GROUP
from shared.redisclient import connect
from shared.telemetry import HeartbeatBase, ServiceHeartbeat, WorkerHeartbeat
from sidecar.dependencies import DependencyCollector, redis_families
from sidecar.exposition import render

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _worker_heartbeat(count: int) -> WorkerHeartbeat:
    base = ServiceHeartbeat(
        pod="bench", boot_id="b" * 32, pid=1, version="bench", started_ms=0, sent_ms=0,
        ready=True, draining=False, rss_bytes=0, heap_bytes=0, loop_lag_ms=0.0,
        redis_ok=True, telemetry_dropped=0,
    )  # fmt: skip
    return WorkerHeartbeat(
        **{name: getattr(base, name) for name in HeartbeatBase.__struct_fields__},
        partition_backlog={f"{i}/{count}": 0 for i in range(count)},
    )


async def _fill(client: redis.asyncio.Redis, keys: Keys, count: int, entries: int) -> None:
    for p in keys.partitions(count):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(entries):
                pipe.xadd(p.readings, {"b": b"x" * 200, "n": i})
            for i in range(3):
                pipe.xadd(p.readings_dead, {"n": i})
            await pipe.execute()
        await client.xgroup_create(p.readings, PERSIST_GROUP, id="0")
        await client.xreadgroup(PERSIST_GROUP, "bench", {p.readings: ">"}, count=entries // 2)


async def _stats(client: redis.asyncio.Redis) -> tuple[int, float]:
    info = await client.info("stats", "cpu")
    return int(info["total_commands_processed"]), float(info["used_cpu_sys"]) + float(
        info["used_cpu_user"]
    )


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(partitions: list[int], rounds: int, entries: int) -> None:
    probe = redis.asyncio.Redis.from_url(REDIS_URL)
    client = connect(REDIS_URL, cluster=False, connect_timeout=1.0, socket_timeout=2.0)
    print(
        "| partitions | commands / collection | Redis CPU / collection | collect median | "
        "collect p99 | render median | series |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count in partitions:
        keys = Keys(f"bench:{uuid.uuid4().hex[:8]}:")
        try:
            await _fill(probe, keys, count, entries)
            collector = DependencyCollector(client, keys, max_age=0.0, timeout=5.0)
            collector.follow(_worker_heartbeat(count))
            await collector.collect()  # connections made, scripts of nothing: warm
            commands_before, cpu_before = await _stats(probe)
            collect_s: list[float] = []
            render_s: list[float] = []
            body = b""
            for _ in range(rounds):
                started = time.perf_counter()
                collection = await collector.collect()
                collect_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                body = render(redis_families(collection), openmetrics=False)
                render_s.append(time.perf_counter() - started)
            commands_after, cpu_after = await _stats(probe)
            assert collector.failures == 0
            # Less the INFO that read the figures before (counted in "after").
            commands = (commands_after - commands_before - 1) / rounds
            cpu_us = (cpu_after - cpu_before) / rounds * 1e6
            series = sum(
                1 for line in body.decode().splitlines() if line and not line.startswith("#")
            )
            median_ms = statistics.median(collect_s) * 1e3
            p99_ms = _p(collect_s, 0.99) * 1e3
            render_ms = statistics.median(render_s) * 1e3
            print(
                f"| {count} | {commands:.0f} | {cpu_us:.0f} µs | {median_ms:.2f} ms | "
                f"{p99_ms:.2f} ms | {render_ms:.2f} ms | {series} |"
            )
        finally:
            doomed = [k async for k in probe.scan_iter(match=f"{keys.prefix}*", count=1000)]
            if doomed:
                await probe.delete(*doomed)
    await client.aclose()
    await probe.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--entries", type=int, default=200, help="entries per partition")
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 12, 128])
    args = parser.parse_args()
    asyncio.run(run(args.partitions, args.rounds, args.entries))


if __name__ == "__main__":
    main()
