"""The worker as a real process under faults: kill -9 mid-batch, Postgres restarted mid-load.

The readings stream is filled in the service's entry format; what must hold is that every
entry the stream holds (every batch the service acknowledged) ends up in ``readings``
exactly once, whatever happened to the worker or to Postgres on the way.
"""

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from aiohttp import ClientSession, ClientTimeout
from redis.asyncio import Redis

from shared.keys import Keys
from shared.schema import upgrade_schema
from tests.support.worker import (
    PostgresCluster,
    WorkerProcess,
    add_readings,
    caught_up,
    eventually,
    group_state,
    reading,
    stored_counts,
    worker_config,
)

DEVICES = 20


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            print(process.output())  # shown with a failure


async def test_kill_9_mid_batch_then_another_worker_stores_every_batch_exactly_once(
    migrated: str, redis: Redis, keys: Keys, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    device_ids = [f"kill-{keys.prefix.split(':')[1]}-{i}" for i in range(DEVICES)]
    batches = [
        reading(d, seq, ppg=[float(seq % 97)] * 50) for seq in range(600) for d in device_ids
    ]
    for start in range(0, len(batches), 2000):
        await add_readings(redis, keys, batches[start : start + 2000])
    first = WorkerProcess(worker_config(keys, migrated, "kill-1"), log_dir=tmp_path / "w1")
    workers.append(first)
    first.start()

    async def some_stored_and_a_batch_in_hand() -> bool:
        stored = len(await stored_counts(migrated, device_ids))
        return stored >= 2000 and (await group_state(redis, keys))[1] > 0

    # Stopped while its batch in hand is seen, so the kill cannot come just after its ack.
    while True:
        await eventually(some_stored_and_a_batch_in_hand, within=30, every=0.01)
        first.send_signal(signal.SIGSTOP)
        if (await group_state(redis, keys))[1] > 0:
            break
        first.send_signal(signal.SIGCONT)
    first.kill()
    _, pending_after_kill = await group_state(redis, keys)
    stored_at_kill = len(await stored_counts(migrated, device_ids))
    second = WorkerProcess(worker_config(keys, migrated, "kill-2"), log_dir=tmp_path / "w2")
    workers.append(second)
    second.start()
    await eventually(lambda: caught_up(redis, keys), within=60)

    counts = await stored_counts(migrated, device_ids)
    assert pending_after_kill > 0  # the kill left a batch read but not acknowledged
    assert stored_at_kill < len(batches)
    assert len(counts) == len(batches)
    assert set(counts.values()) == {1}
    assert "claimed" in second.output()
    assert second.logged("error") == []


@contextlib.asynccontextmanager
async def steady_load(redis: Redis, keys: Keys, device_ids: list[str]) -> AsyncIterator[list[int]]:
    """Batches keep arriving (20 every 20 ms) until the block ends; yields the count so far."""
    sent = [0]
    stop = asyncio.Event()

    async def produce() -> None:
        seq = 0
        while not stop.is_set():
            await add_readings(redis, keys, [reading(d, seq) for d in device_ids])
            sent[0] += len(device_ids)
            seq += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(produce())
    try:
        yield sent
    finally:
        stop.set()
        await task


async def readiness(url: str) -> int:
    async with (
        ClientSession(timeout=ClientTimeout(total=2)) as session,
        session.get(f"{url}/health/readiness") as response,
    ):
        return response.status


async def test_postgres_restarted_mid_load_the_worker_waits_and_resumes_losing_nothing(
    redis: Redis, keys: Keys, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    cluster = PostgresCluster(tmp_path / "pg")
    try:
        cluster.init()
        cluster.start()
        async with await psycopg.AsyncConnection.connect(cluster.url) as conn:
            await upgrade_schema(conn)
        worker = WorkerProcess(
            worker_config(keys, cluster.url, "pg-restart"), log_dir=tmp_path / "w"
        )
        workers.append(worker)
        worker.start()
        await worker.wait_started()
        device_ids = [f"pg-{keys.prefix.split(':')[1]}-{i}" for i in range(DEVICES)]
        async with steady_load(redis, keys, device_ids) as sent:
            await eventually(lambda: _stored_at_least(cluster.url, device_ids, 200), within=20)
            await asyncio.to_thread(cluster.stop, "immediate")
            await eventually(lambda: _status_is(worker.url, 503), within=10)
            await asyncio.sleep(1.0)  # batches keep arriving while Postgres is away
            backlog_in_outage = (await group_state(redis, keys))[0]
            await asyncio.to_thread(cluster.start)
            await eventually(lambda: _status_is(worker.url, 200), within=20)
            await eventually(lambda: _stored_at_least(cluster.url, device_ids, sent[0]), within=20)
        await eventually(lambda: caught_up(redis, keys), within=20)
        counts = await stored_counts(cluster.url, device_ids)
    finally:
        cluster.kill()

    assert backlog_in_outage > 0
    assert len(counts) == sent[0]
    assert set(counts.values()) == {1}
    assert worker.returncode is None
    assert "Postgres is back" in worker.output()
    assert worker.logged("error") == []


async def _stored_at_least(url: str, device_ids: list[str], count: int) -> bool:
    try:
        return len(await stored_counts(url, device_ids)) >= count
    except psycopg.OperationalError:
        return False


async def _status_is(url: str, status: int) -> bool:
    try:
        return await readiness(url) == status
    except (OSError, TimeoutError):
        return False
