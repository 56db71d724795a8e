"""Clients and a whole process carry on when a primary of the cluster fails.

``kill -9`` of a primary: the cluster promotes its replica after the node timeout, and the
next command on those slots must work on the same client (it refreshes its slot map on the
connection error and retries). A manual failover: the old primary answers ``MOVED`` and the
client follows. Each test brings the killed node back (it rejoins as a replica), so the
cluster is whole for the next.
"""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.keys import Keys
from shared.redisclient import RedisClient
from shared.runtime.heartbeat import HeartbeatPublisher
from shared.telemetry import decode_heartbeat
from tests.support.cluster import LocalCluster
from tests.support.sidecar import SidecarProcess, heartbeat, http_record, scrape, total, xadd_batch

pytestmark = pytest.mark.timeout(90)


async def test_a_cluster_client_keeps_working_across_kill_9_of_a_primary(
    cluster: LocalCluster, cluster_client: RedisClient, keys: Keys
) -> None:
    key = keys.heartbeat("pod-failover")
    primary = cluster.primary_for_key(key)
    replica = cluster.replica_of(primary)
    await cluster_client.set(key, b"before")
    with primary.client() as plain:
        assert plain.wait(1, 2000) == 1  # the replica has it: the promotion keeps it

    cluster.kill(primary)
    await asyncio.to_thread(cluster.wait_promoted, replica)

    # The same client, no caller retry: the first command after the promotion works.
    assert await cluster_client.get(key) == b"before"
    await cluster_client.set(key, b"after")
    with replica.client() as plain:
        assert plain.get(key) == b"after"

    await asyncio.to_thread(cluster.restart, primary)
    assert cluster.role(primary) == ("slave", replica.port)
    assert await cluster_client.get(key) == b"after"


async def test_heartbeats_go_on_through_a_manual_failover(
    cluster: LocalCluster, cluster_client: RedisClient, keys: Keys
) -> None:
    pod = "pod-handover"
    key = keys.heartbeat(pod)
    publisher = HeartbeatPublisher(
        cluster_client, key, lambda: heartbeat(pod), interval=0.05, ttl=5
    )
    task = asyncio.create_task(publisher.run())
    try:
        old = cluster.primary_for_key(key)
        new = await asyncio.to_thread(cluster.failover, old)
        assert cluster.primary_for_key(key) is new
        with new.client() as plain:
            first = plain.get(key)
            assert first is not None
            async with asyncio.timeout(5):
                while plain.get(key) == first:  # written again, on the new primary
                    await asyncio.sleep(0.05)
            raw = plain.get(key)
            assert raw is not None
            assert decode_heartbeat(raw).pod == pod
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def sidecars() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for process in started:
        process.kill()


async def test_the_sidecar_process_runs_on_the_cluster_and_outlives_its_pods_primary(
    cluster: LocalCluster,
    cluster_client: RedisClient,
    keys: Keys,
    key_prefix: str,
    migrated: str,
    tmp_path: Path,
    sidecars: list[SidecarProcess],
) -> None:
    pod = "pod-sidecar-cluster"
    config = {
        "REDIS_URL": cluster.url,
        "REDIS_CLUSTER": "true",
        "DATABASE_URL": migrated,
        "REDIS_KEY_PREFIX": key_prefix,
        "POD_NAME": pod,
        "HEALTH_CHECK_INTERVAL": "0.5",
        "HEALTH_CHECK_TIMEOUT": "1000",
        "SIDECAR_BLOCK_MS": "200",
        "SIDECAR_CHECKPOINT_INTERVAL": "0.2",
    }
    # Seeded with a node that does not own the pod's slot: the client must find it.
    seed = next(
        n for n in cluster.primaries() if n is not cluster.primary_for_key(keys.telemetry(pod))
    )
    config["REDIS_URL"] = seed.url
    sidecar = SidecarProcess(config, log_dir=tmp_path / "sidecar")
    sidecars.append(sidecar)
    sidecar.start()
    await sidecar.wait_live()

    async def counted() -> float:
        return total(await scrape(sidecar.url), "http_requests_total")

    async def until_counted(expected: int) -> None:
        async with asyncio.timeout(20):
            while await counted() != expected:
                assert sidecar.returncode is None, sidecar.output()
                await asyncio.sleep(0.1)

    await xadd_batch(cluster_client, keys, pod, [http_record()] * 4)
    await until_counted(4)

    primary = cluster.primary_for_key(keys.telemetry(pod))
    replica = cluster.replica_of(primary)
    with primary.client() as plain:
        plain.wait(1, 2000)  # the checkpoint and the stream are on the replica too
    cluster.kill(primary)
    await asyncio.to_thread(cluster.wait_promoted, replica)
    await xadd_batch(cluster_client, keys, pod, [http_record()] * 3)
    await until_counted(7)
    assert sidecar.returncode is None

    await asyncio.to_thread(cluster.restart, primary)
