"""A worker killed with kill -9: its pending entries move on once it is known dead.

Real worker processes on the real Redis and Postgres; ``WORKER_CLAIM_IDLE`` is a minute, so
only the dead-consumer claim (the heartbeat gone, or another process's) can store the
killed worker's entries within the test's bounds.
"""

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.readings import PERSIST_GROUP, decode_entries
from tests.support.worker import (
    WorkerProcess,
    add_readings,
    caught_up,
    eventually,
    reading,
    stored_counts,
    worker_config,
)

DEVICES = 20


def config(keys: Keys, database_url: str, pod: str, *, heartbeat_ttl: int) -> dict[str, str]:
    return {
        **worker_config(keys, database_url, pod),
        "WORKER_CLAIM_IDLE": "60",
        "HEARTBEAT_INTERVAL": "0.5",
        "HEARTBEAT_TTL": str(heartbeat_ttl),
    }


@pytest.fixture
async def workers() -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            print(process.output())  # shown with a failure


async def pending_of(redis: Redis, keys: Keys, consumer: str) -> list[bytes]:
    entries = await redis.xpending_range(
        keys.readings, PERSIST_GROUP, min="-", max="+", count=100_000, consumername=consumer
    )
    return [cast(bytes, e["message_id"]) for e in entries]


async def consumer_of(redis: Redis, keys: Keys, pod: str) -> str:
    """The consumer of ``pod``'s worker that has entries pending."""
    for info in await redis.xinfo_consumers(keys.readings, PERSIST_GROUP):
        name = info["name"].decode()
        if name.startswith(f"{pod}:") and info["pending"]:
            return cast(str, name)
    return ""


async def batches_of(redis: Redis, keys: Keys, ids: list[bytes]) -> list[tuple[str, int]]:
    out = []
    for entry_id in ids:
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await redis.xrange(keys.readings, min=entry_id, max=entry_id),
        )
        for _, fields in entries:
            for batch in decode_entries(fields):
                body = json.loads(batch.batch)
                out.append((body["device_id"], body["seq"]))
    return out


async def kill_when_busy(
    redis: Redis, keys: Keys, migrated: str, device_ids: list[str], victim: WorkerProcess, pod: str
) -> tuple[float, list[tuple[str, int]]]:
    """Kill ``victim`` while it holds entries; when, and the batches it held.

    The victim is stopped (SIGSTOP) while its pending entries are read, so what it holds
    cannot change between the look and the kill.
    """

    async def holding() -> bool:
        stored = len(await stored_counts(migrated, device_ids))
        return stored >= 2000 and bool(await consumer_of(redis, keys, pod))

    while True:
        await eventually(holding, within=30, every=0.005)
        victim.send_signal(signal.SIGSTOP)
        consumer = await consumer_of(redis, keys, pod)
        held = await pending_of(redis, keys, consumer) if consumer else []
        if held:
            break
        victim.send_signal(signal.SIGCONT)
    victim.kill()
    killed_at = time.monotonic()
    return killed_at, await batches_of(redis, keys, held)


async def stored_after(
    migrated: str, device_ids: list[str], held: list[tuple[str, int]], since: float
) -> float:
    """Seconds from ``since`` until every batch in ``held`` is in ``readings``."""

    async def all_stored() -> bool:
        counts = await stored_counts(migrated, device_ids)
        return all(batch in counts for batch in held)

    await eventually(all_stored, within=30, every=0.01)
    return time.monotonic() - since


async def test_a_worker_killed_mid_load_has_its_entries_taken_over_when_its_heartbeat_expires(
    migrated: str, redis: Redis, keys: Keys, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    device_ids = [f"dead-{keys.prefix.split(':')[1]}-{i}" for i in range(DEVICES)]
    batches = [reading(d, seq) for seq in range(1500) for d in device_ids]
    for start in range(0, len(batches), 5000):
        await add_readings(redis, keys, batches[start : start + 5000])
    pods = ("dead-1", "dead-2")
    for pod in pods:
        process = WorkerProcess(
            config(keys, migrated, pod, heartbeat_ttl=2), log_dir=tmp_path / pod
        )
        workers.append(process)
        process.start()

    killed_at, held = await kill_when_busy(redis, keys, migrated, device_ids, workers[0], pods[0])
    took = await stored_after(migrated, device_ids, held, killed_at)
    await eventually(lambda: caught_up(redis, keys), within=60)
    counts = await stored_counts(migrated, device_ids)

    print(f"kill -9 to the last of {len(held)} held batches stored: {took:.2f} s")
    assert held  # the kill left batches read but not acknowledged
    assert len(counts) == len(batches)
    assert set(counts.values()) == {1}
    assert "of a dead consumer" in workers[1].output()
    assert workers[1].logged("error") == []


async def test_a_worker_s_successor_in_its_pod_takes_its_entries_at_once(
    migrated: str, redis: Redis, keys: Keys, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    device_ids = [f"succ-{keys.prefix.split(':')[1]}-{i}" for i in range(DEVICES)]
    batches = [reading(d, seq) for seq in range(600) for d in device_ids]
    for start in range(0, len(batches), 5000):
        await add_readings(redis, keys, batches[start : start + 5000])
    # The heartbeat outlives the test: only its boot id says the first process is gone.
    first = WorkerProcess(config(keys, migrated, "succ", heartbeat_ttl=300), log_dir=tmp_path / "1")
    workers.append(first)
    first.start()

    killed_at, held = await kill_when_busy(redis, keys, migrated, device_ids, first, "succ")
    second = WorkerProcess(
        config(keys, migrated, "succ", heartbeat_ttl=300), log_dir=tmp_path / "2"
    )
    workers.append(second)
    second.start()
    took = await stored_after(migrated, device_ids, held, killed_at)
    print(f"kill -9, a successor started, the last of {len(held)} held stored: {took:.2f} s")
    await eventually(lambda: caught_up(redis, keys), within=60)
    counts = await stored_counts(migrated, device_ids)

    assert held
    assert len(counts) == len(batches)
    assert set(counts.values()) == {1}
    assert "of a dead consumer" in second.output()
