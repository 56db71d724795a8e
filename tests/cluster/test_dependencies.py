"""The sidecar's collection of Redis's figures on a Redis Cluster: every node's INFO, each
asked on its own and labelled with its address, and the partitions' streams on their shards."""

import asyncio

from shared.keys import Keys
from shared.readings import PERSIST_GROUP
from shared.redisclient import RedisClient
from shared.telemetry import HeartbeatBase, WorkerHeartbeat
from sidecar.dependencies import DependencyCollector, redis_families
from sidecar.exposition import render
from tests.support.cluster import LocalCluster
from tests.support.sidecar import heartbeat, total


async def test_every_node_is_a_series_and_the_partitions_are_read_on_their_shards(
    cluster: LocalCluster, cluster_client: RedisClient
) -> None:
    keys = Keys("deps:")
    for p in keys.partitions(6):
        await cluster_client.xadd(p.readings, {"n": 1})
        await cluster_client.xgroup_create(p.readings, PERSIST_GROUP, id="0")
    service = heartbeat("w")
    worker = WorkerHeartbeat(
        **{name: getattr(service, name) for name in HeartbeatBase.__struct_fields__},
        partition_backlog={f"{i}/6": 1 for i in range(6)},
    )
    collector = DependencyCollector(cluster_client, keys, max_age=0.0, timeout=5.0)
    collector.follow(worker)

    # CLUSTER SLOTS leaves a replica out until it has acknowledged some replication (about
    # a second after the writes above); the primaries name it, so the slot map is read again.
    async with asyncio.timeout(10):
        while len((collection := await collector.collect()).nodes) < 6:
            await asyncio.sleep(0.2)
    text = render(redis_families(collection), openmetrics=False).decode()

    assert collector.failures == 0
    assert len(collection.nodes) == 6
    assert all(info is not None for info in collection.nodes.values())
    assert collection.commands == 6 + 3 * 6
    assert total(text, "pulsecal_redis_up") == 6
    assert total(text, "pulsecal_redis_primary") == 3
    assert total(text, "pulsecal_redis_connected_replicas") == 3
    assert total(text, "pulsecal_redis_master_link_up") == 3
    assert total(text, "pulsecal_readings_stream_length") == 6
    assert total(text, "pulsecal_readings_group_lag", group=PERSIST_GROUP) == 6
