"""Readings partitions on one Redis: real service and worker processes, real Postgres.

- Devices spread over the partitions; two workers divide them and store every acknowledged
  batch exactly once; one killed with ``kill -9``, the other takes its partitions and the
  entries it held.
- ``INGEST_PARTITIONS`` changed on a running system (1 -> 3): the old layout is drained
  beside the new, retries of batches acknowledged under the old one store nothing twice,
  and the old layout is forgotten once drained and no service wrote it for the grace.
"""

import asyncio
import signal
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.partitions import partition_index
from shared.readings import PERSIST_GROUP
from tests.support.env import REDIS_URL, Device, DeviceFactory
from tests.support.load import acked, device_load, rows_per_batch
from tests.support.outcomes import Outcome
from tests.support.procs import ServiceProcess
from tests.support.worker import WorkerProcess, eventually, worker_config

DEVICES = 24


@pytest.fixture
def keys() -> Keys:
    return Keys(f"parts-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
async def devices(make_device: DeviceFactory) -> list[Device]:
    return [await make_device() for _ in range(DEVICES)]


def service_config(keys: Keys, migrated: str, partitions: int, pod: str) -> dict[str, str]:
    return {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": migrated,
        "REDIS_KEY_PREFIX": keys.prefix,
        "POD_NAME": pod,
        "INGEST_PARTITIONS": str(partitions),
        "BACKLOG_CHECK_INTERVAL": "0.2",
        "TOKEN_REFRESH_INTERVAL": "0.5",
        "RETRY_AFTER": "1",
        "SHUTDOWN_TIMEOUT": "3",
    }


def workers_config(keys: Keys, migrated: str, partitions: int, pod: str) -> dict[str, str]:
    return {
        **worker_config(keys, migrated, pod),
        "INGEST_PARTITIONS": str(partitions),
        "INGEST_LAYOUT_GRACE": "1",
        "WORKER_CLAIM_IDLE": "30",  # only the dead-consumer takeover is fast
        "HEARTBEAT_INTERVAL": "0.5",
        "HEARTBEAT_TTL": "2",
    }


async def group_left(redis: Redis, stream: str) -> tuple[int, int]:
    """(lag, pending) of the persist group on ``stream``; (-1, -1) without one."""
    if not await redis.exists(stream):
        return -1, -1
    for group in await redis.xinfo_groups(stream):
        if group["name"] == PERSIST_GROUP.encode():
            lag = group["lag"]
            return (-1 if lag is None else int(lag)), int(group["pending"])
    return -1, -1


async def all_drained(redis: Redis, keys: Keys, *counts: int) -> bool:
    for count in counts:
        for partition in keys.partitions(count):
            if await redis.exists(partition.readings) and await group_left(
                redis, partition.readings
            ) != (0, 0):
                return False
    return True


def owned_partitions(worker: WorkerProcess) -> set[str]:
    """The partitions the worker consumes now, by what it logged."""
    owned: set[str] = set()
    for line in worker.output().splitlines():
        for marker, add in (("consuming readings partition ", True), ("partition ", False)):
            if marker in line and (add or "handed over" in line):
                name = line.split(marker, 1)[1].split()[0].split('"', 1)[0]
                (owned.add if add else owned.discard)(name)
                break
    return owned


async def acked_at_least(outcomes: list[Outcome], count: int) -> bool:
    return len(acked(outcomes)) >= count


async def owns(worker: WorkerProcess, count: int) -> bool:
    return len(owned_partitions(worker)) == count


async def test_two_workers_divide_the_partitions_and_store_each_batch_once(
    redis: Redis,
    keys: Keys,
    migrated: str,
    devices: list[Device],
    processes: list[ServiceProcess | WorkerProcess],
    tmp_path: Path,
) -> None:
    partitions = 4
    service = ServiceProcess(
        service_config(keys, migrated, partitions, "parts-svc"), log_dir=tmp_path / "s"
    )
    workers = [
        WorkerProcess(
            workers_config(keys, migrated, partitions, f"parts-w{i}"), log_dir=tmp_path / f"w{i}"
        )
        for i in range(2)
    ]
    processes += [service, *workers]
    service.start()
    for worker in workers:
        worker.start()
    await service.wait_started()
    for worker in workers:
        await worker.wait_started()

    async with device_load(service.url, devices) as outcomes:
        # Each worker owns half of the partitions.
        for worker in workers:
            await eventually(lambda w=worker: owns(w, partitions // 2), within=20)
        await asyncio.sleep(1.0)
        # One worker dies mid-load; the other takes its partitions and what it held.
        workers[0].kill()
        await eventually(lambda: owns(workers[1], partitions), within=20)
        await asyncio.sleep(1.0)
    sent = acked(outcomes)
    assert len(sent) > DEVICES * 20
    assert not [o for o in outcomes if o.status not in (202,)]

    await eventually(lambda: all_drained(redis, keys, partitions), within=60)
    rows = await rows_per_batch(migrated, [d.device_id for d in devices])
    assert set(rows) == sent
    assert set(rows.values()) == {1}
    # Every partition got devices.
    for partition in keys.partitions(partitions):
        assert await redis.exists(partition.readings)
    spread = {partition_index(d.device_id, partitions) for d in devices}
    assert spread == set(range(partitions))
    assert not service.logged_errors()
    # Whatever the killed worker held (it may have held nothing at that instant) was taken
    # over: every partition drained to no pending entry above, every ack stored once.


async def test_changing_the_partition_count_loses_and_duplicates_nothing(
    redis: Redis,
    keys: Keys,
    migrated: str,
    devices: list[Device],
    processes: list[ServiceProcess | WorkerProcess],
    tmp_path: Path,
) -> None:
    # The old layout: one partition, written while no worker runs (a backlog to drain).
    old = ServiceProcess(service_config(keys, migrated, 1, "parts-old"), log_dir=tmp_path / "old")
    processes.append(old)
    old.start()
    await old.wait_started()
    async with device_load(old.url, devices) as before:
        await eventually(lambda: acked_at_least(before, DEVICES * 10), within=30)
    old.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await old.exited() == 0

    # The new layout: three partitions. Devices go on, each first retrying its last ten
    # seqs (acknowledged under the old layout: stored again in the new one, a row once).
    new = ServiceProcess(service_config(keys, migrated, 3, "parts-new"), log_dir=tmp_path / "new")
    processes.append(new)
    new.start()
    await new.wait_started()
    last = {d.device_id: max(s for dev, s in acked(before) if dev == d.device_id) for d in devices}
    first_seq = min(last.values()) - 9
    worker = WorkerProcess(workers_config(keys, migrated, 3, "parts-w"), log_dir=tmp_path / "w")
    processes.append(worker)
    async with device_load(new.url, devices, first_seq=first_seq) as after:
        worker.start()
        await eventually(lambda: acked_at_least(after, DEVICES * 20), within=30)
    sent = acked(before) | acked(after)

    await eventually(lambda: all_drained(redis, keys, 1, 3), within=60)
    rows = await rows_per_batch(migrated, [d.device_id for d in devices])
    assert set(rows) == sent
    assert set(rows.values()) == {1}
    assert owned_partitions(worker) == {"0/1", "0/3", "1/3", "2/3"}
    # No service writes the old layout any more: forgotten once the grace is over.
    await eventually(lambda: _score_is_none(redis, keys.ingest_layouts, "1"), within=20)
    assert await redis.zscore(keys.ingest_layouts, "3") is not None
    # Noted as retired, for its emptied streams to go a minute later (worker/cleaner.py).
    assert await redis.zscore(keys.retired_layouts, "1") is not None
    assert not old.logged_errors()
    assert not new.logged_errors()


async def _score_is_none(redis: Redis, key: str, member: str) -> bool:
    return await redis.zscore(key, member) is None
