"""Ingestion on a real Redis Cluster: the service and two workers as processes, real Postgres.

Devices send over HTTP to a service writing six partitions (two per primary) with
replicated acks; two workers divide the partitions. Mid-load, a replica is promoted by hand
(``CLUSTER FAILOVER``) and another shard's primary is killed with ``kill -9`` (its replica
takes over; the killed node comes back as a replica). The service and the workers follow by
themselves: every acknowledged batch ends in Postgres exactly once, and every answer is an
ack, a 503 with Retry-After or no answer (the connection went with the primary).
"""

import asyncio
import collections
import time
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout

from shared.keys import Keys
from shared.readings import PERSIST_GROUP
from shared.redisclient import RedisClient
from tests.support.cluster import LocalCluster
from tests.support.env import Device, DeviceFactory
from tests.support.load import acked, device_load, rows_per_batch
from tests.support.outcomes import Outcome
from tests.support.procs import ServiceProcess
from tests.support.worker import WorkerProcess, eventually, worker_config

PARTITIONS = 6
DEVICES = 24
KEYS = Keys("clustered:")
OPERATOR_TOKEN = "cluster-operator"  # noqa: S105 - the test's own token


@pytest.fixture
async def devices(make_device: DeviceFactory) -> list[Device]:
    return [await make_device() for _ in range(DEVICES)]


def cluster_env(cluster: LocalCluster) -> dict[str, str]:
    return {
        "REDIS_URL": cluster.url,
        "REDIS_CLUSTER": "true",
        "REDIS_KEY_PREFIX": KEYS.prefix,
        "INGEST_PARTITIONS": str(PARTITIONS),
        "HEALTH_CHECK_INTERVAL": "0.2",
        "HEALTH_CHECK_TIMEOUT": "1000",
    }


async def acks_since(outcomes: list[Outcome], since: float, count: int) -> bool:
    return sum(1 for o in outcomes if o.status == 202 and o.started >= since) >= count


async def drained(redis: RedisClient) -> bool:
    for partition in KEYS.partitions(PARTITIONS):
        groups = await redis.xinfo_groups(partition.readings)
        persist = [g for g in groups if g["name"] == PERSIST_GROUP.encode()]
        if not persist or (persist[0]["lag"], persist[0]["pending"]) != (0, 0):
            return False
    return True


def unexplained(outcomes: list[Outcome]) -> list[Outcome]:
    return [
        o
        for o in outcomes
        if not (o.status in (202, 0) or (o.status == 503 and o.retry_after == "1"))
    ]


async def test_the_service_and_two_workers_ride_out_a_failover_and_a_killed_primary(
    cluster: LocalCluster,
    cluster_client: RedisClient,
    migrated: str,
    devices: list[Device],
    processes: list[ServiceProcess | WorkerProcess],
    tmp_path: Path,
) -> None:
    partitions = KEYS.partitions(PARTITIONS)
    owners = {cluster.primary_for_key(p.readings).port for p in partitions}
    assert owners == {n.port for n in cluster.primaries()}  # two partitions on each primary

    service = ServiceProcess(
        {
            **cluster_env(cluster),
            "DATABASE_URL": migrated,
            "POD_NAME": "clustered-svc",
            "ACK_MODE": "replicated",
            "ACK_REPLICAS": "1",
            "ACK_TIMEOUT": "0.5",
            "WRITE_TIMEOUT": "1",
            "RETRY_AFTER": "1",
            "TOKEN_REFRESH_INTERVAL": "0.5",
            "SHUTDOWN_TIMEOUT": "2",
            "HEALTH_DETAIL_TOKEN": OPERATOR_TOKEN,
        },
        log_dir=tmp_path / "service",
    )
    workers = [
        WorkerProcess(
            {
                **worker_config(KEYS, migrated, f"clustered-w{i}"),
                **cluster_env(cluster),
                "HEARTBEAT_INTERVAL": "0.5",
                "HEARTBEAT_TTL": "2",
            },
            log_dir=tmp_path / f"worker{i}",
        )
        for i in range(2)
    ]
    processes += [service, *workers]
    for process in processes:
        process.start()
    await service.wait_started()
    for worker in workers:
        await worker.wait_started()

    async with device_load(service.url, devices) as outcomes:
        await eventually(lambda: acks_since(outcomes, 0, DEVICES * 5), within=30)

        # A manual failover of the first partition's primary.
        first = cluster.primary_for_key(partitions[0].readings)
        await asyncio.to_thread(cluster.failover, first)
        since = time.monotonic()
        await eventually(lambda: acks_since(outcomes, since, DEVICES * 5), within=30)

        # kill -9 of another shard's primary; its replica takes over, then it comes back as
        # a replica (replicated acks need one) and acks resume on its partitions too.
        victim = next(
            cluster.primary_for_key(p.readings)
            for p in partitions
            if cluster.primary_for_key(p.readings).port
            != cluster.primary_for_key(partitions[0].readings).port
        )
        replica = cluster.replica_of(victim)
        cluster.kill(victim)
        promoted = asyncio.ensure_future(asyncio.to_thread(cluster.wait_promoted, replica))
        # One shard down leaves the pod ready: the other partitions' devices go on.
        readiness = []
        async with ClientSession(timeout=ClientTimeout(total=2)) as session:
            while not promoted.done():
                async with session.get(
                    f"{service.url}/health/readiness",
                    headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                ) as response:
                    readiness.append(response.status)
                    if response.status != 200:
                        print(await response.text())
                await asyncio.sleep(0.1)
        await promoted
        await asyncio.to_thread(cluster.restart, victim)
        since = time.monotonic()
        victim_partitions = {
            p.partition.index for p in partitions if cluster.primary_for_key(p.readings) == replica
        }
        await eventually(lambda: acks_since(outcomes, since, DEVICES * 5), within=30)
        await asyncio.sleep(1.0)
    sent = acked(outcomes)
    assert victim_partitions
    print(f"readiness while a primary was down: {readiness}")
    assert readiness
    assert set(readiness) == {200}
    statuses = collections.Counter(o.status for o in outcomes)
    print(f"answers: {dict(statuses)}")

    await eventually(lambda: drained(cluster_client), within=60)
    rows = await rows_per_batch(migrated, [d.device_id for d in devices])
    # Every acknowledged batch, once (a batch answered 503 may be there too: stored, but
    # not known in time to be on a replica).
    assert not sent - set(rows)
    assert set(rows.values()) == {1}
    assert not unexplained(outcomes), unexplained(outcomes)[:5]
    # Every partition's devices were acknowledged after the kill: the service followed.
    late = {o.device_id for o in outcomes if o.status == 202 and o.started >= since}
    assert len(late) == DEVICES
    assert not service.logged_errors()
    # Both workers consumed: each took partitions.
    for worker in workers:
        assert "consuming readings partition" in worker.output()
