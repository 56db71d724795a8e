"""The dependencies' health beside a worker: Redis and the readings streams collected from the
real Redis, the database's figures from the worker's heartbeat, and the exposition of both
under promtool."""

import asyncio
import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis, RedisCluster

from shared.keys import Keys
from shared.readings import PERSIST_GROUP
from shared.redisclient import connect
from shared.settings import SidecarSettings
from shared.telemetry import HeartbeatBase, PostgresStats, WorkerHeartbeat, encode_heartbeat
from sidecar.app import create_app
from sidecar.dependencies import (
    Collection,
    DependencyCollector,
    consumed_layouts,
    postgres_families,
    redis_families,
)
from sidecar.exposition import render
from tests.support.env import AiohttpClient
from tests.support.sidecar import heartbeat, promtool_check, series_values, total

Client = TestClient[web.Request, web.Application]


def worker_heartbeat(
    pod: str, backlog: dict[str, int], postgres: PostgresStats | None = None
) -> WorkerHeartbeat:
    service = heartbeat(pod)
    return WorkerHeartbeat(
        **{name: getattr(service, name) for name in HeartbeatBase.__struct_fields__},
        partition_backlog=backlog,
        postgres=postgres,
    )


async def eventually(probe: Callable[[], Awaitable[bool]], *, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not await probe():
            await asyncio.sleep(0.05)


async def _fill_partitions(redis: Redis, keys: Keys) -> None:
    """Layout of 3: partition 0 with 5 entries, 2 read and unacknowledged, 1 acknowledged;
    partition 1 with 4 entries and a group that has read none, and 2 dead letters; partition
    2 not created at all."""
    p0, p1, _ = keys.partitions(3)
    ids = [await redis.xadd(p0.readings, {"n": i}) for i in range(5)]
    await redis.xgroup_create(p0.readings, PERSIST_GROUP, id="0")
    await redis.xreadgroup(PERSIST_GROUP, "c1", {p0.readings: ">"}, count=3)
    await redis.xack(p0.readings, PERSIST_GROUP, ids[0])
    for i in range(4):
        await redis.xadd(p1.readings, {"n": i})
    await redis.xgroup_create(p1.readings, PERSIST_GROUP, id="0")
    for i in range(2):
        await redis.xadd(p1.readings_dead, {"n": i})


STATS = PostgresStats(
    measured_ms=1_700_000_000_000,
    connections={"active": 2, "idle": 7, "idle_in_transaction": 1},
    database_bytes=50_000_000,
    readings_partitions_ahead=7,
    readings_oldest_day_ms=1_699_920_000_000,
)


async def test_one_collection_reads_info_and_every_partition_of_the_layouts(
    redis: Redis, keys: Keys
) -> None:
    await _fill_partitions(redis, keys)
    collector = DependencyCollector(redis, keys, max_age=60.0, timeout=2.0)
    assert collector.follow(worker_heartbeat("w", {"0/3": 0, "1/3": 0, "2/3": 0}))

    collection = await collector.collect()

    [(node, info)] = collection.nodes.items()
    assert node == "127.0.0.1:6379"
    assert info is not None
    assert info["role"] == "master"
    assert {"used_memory", "maxmemory", "aof_enabled", "evicted_keys"} <= info.keys()
    streams = {s.partition: s for s in collection.streams}
    assert streams["0/3"].length == 5
    assert streams["0/3"].groups == ((PERSIST_GROUP, 2, 2),)
    assert streams["1/3"].length == 4
    assert streams["1/3"].groups == ((PERSIST_GROUP, 4, 0),)
    assert streams["1/3"].dead_letters == 2
    assert streams["2/3"] == dataclasses.replace(streams["2/3"], length=0, dead_letters=0)
    assert streams["2/3"].groups == ()
    # One INFO, and three commands a partition: what a collection costs, whatever the load.
    assert collection.commands == 1 + 3 * 3
    assert collector.failures == 0


async def test_scrapes_within_the_cache_share_one_collection(redis: Redis, keys: Keys) -> None:
    await _fill_partitions(redis, keys)
    collector = DependencyCollector(redis, keys, max_age=60.0, timeout=2.0)
    collector.follow(worker_heartbeat("w", {"0/3": 0, "1/3": 0, "2/3": 0}))

    first, *others = await asyncio.gather(*(collector.collect() for _ in range(5)))
    again = await collector.collect()

    assert all(other is first for other in others)
    assert again is first
    assert collector.collections == 1
    # A new layout is collected at once, whatever the cache.
    collector.follow(worker_heartbeat("w", {"0/1": 0, "0/3": 0, "1/3": 0, "2/3": 0}))
    assert (await collector.collect()).commands == 1 + 3 * 4
    assert collector.collections == 2


async def test_collection_follows_the_worker_and_keeps_what_it_knew_while_it_is_gone(
    redis: Redis, keys: Keys
) -> None:
    collector = DependencyCollector(redis, keys, max_age=0.0, timeout=2.0)

    assert not collector.follow(None)
    assert not collector.follow(heartbeat("svc"))
    assert collector.follow(worker_heartbeat("w", {"0/12": 1, "5/12": 2, "0/1": 0, "bad": 0}))
    assert collector.layouts == (1, 12)
    # Heartbeat missing, or from before partitions: still beside a worker, same layouts.
    assert collector.follow(None)
    assert collector.follow(worker_heartbeat("w", {}))
    assert collector.layouts == (1, 12)
    assert consumed_layouts(worker_heartbeat("w", {"0/2000": 0, "1/0": 0})) == ()


async def test_an_unreachable_redis_is_up_0_and_no_stream_series(keys: Keys) -> None:
    # Made as the sidecar makes its client (no retries of its own).
    unreachable = connect(
        "redis://127.0.0.1:1", cluster=False, connect_timeout=0.2, socket_timeout=0.5
    )
    collector = DependencyCollector(unreachable, keys, max_age=0.0, timeout=1.0)
    collector.follow(worker_heartbeat("w", {"0/1": 0}))
    try:
        collection = await collector.collect()
    finally:
        await unreachable.aclose()

    text = render(redis_families(collection), openmetrics=False).decode()
    assert total(text, "pulsecal_redis_up", redis_node="127.0.0.1:1") == 0
    assert "\npulsecal_readings_stream_length{" not in text
    assert collector.failures == 2


def _info(**fields: Any) -> dict[str, Any]:
    base = {
        "role": "master",
        "used_memory": 900,
        "maxmemory": 1000,
        "evicted_keys": 0,
        "rejected_connections": 0,
        "connected_clients": 12,
        "blocked_clients": 3,
        "aof_enabled": 1,
        "aof_last_write_status": "ok",
        "aof_last_bgrewrite_status": "ok",
        "rdb_last_bgsave_status": "ok",
        "connected_slaves": 0,
    }
    return base | fields


def test_replication_persistence_and_refusals_as_series() -> None:
    collection = Collection(
        nodes={
            "10.0.0.1:6379": _info(
                connected_slaves=1,
                slave0={"ip": "10.0.0.2", "port": 6379, "state": "online", "lag": 4},
                errorstat_OOM={"count": 17},
                errorstat_ERR={"count": 99},
                aof_last_write_status="err",
            ),
            "10.0.0.2:6379": _info(
                role="slave",
                master_link_status="down",
                master_link_down_since_seconds=42,
                rdb_last_bgsave_status="err",
            ),
            "10.0.0.3:6379": None,
        }
    )

    text = render(redis_families(collection), openmetrics=False).decode()
    values = series_values(text)

    def value(name: str, **labels: str) -> float:
        [found] = [v for (n, ls), v in values.items() if n == name and set(labels.items()) <= ls]
        return found

    primary, replica = "10.0.0.1:6379", "10.0.0.2:6379"
    assert value("pulsecal_redis_up", redis_node="10.0.0.3:6379") == 0
    assert value("pulsecal_redis_primary", redis_node=primary) == 1
    assert value("pulsecal_redis_primary", redis_node=replica) == 0
    assert value("pulsecal_redis_connected_replicas", redis_node=primary) == 1
    assert value("pulsecal_redis_replica_lag_seconds", redis_node=primary, replica=replica) == 4
    assert value("pulsecal_redis_master_link_up", redis_node=replica) == 0
    assert value("pulsecal_redis_master_last_io_seconds", redis_node=replica) == 42
    assert ("pulsecal_redis_master_link_up", frozenset({("redis_node", primary)})) not in values
    assert value("pulsecal_redis_error_replies_total", redis_node=primary, error="OOM") == 17
    assert value("pulsecal_redis_error_replies_total", redis_node=replica, error="OOM") == 0
    assert not [ls for (n, ls) in values if ("error", "ERR") in ls]
    persisted = {"aof_write": 0, "aof_rewrite": 1, "rdb_bgsave": 1}
    for operation, ok in persisted.items():
        labels = {"redis_node": primary, "operation": operation}
        assert value("pulsecal_redis_persistence_ok", **labels) == ok
    assert value("pulsecal_redis_persistence_ok", redis_node=replica, operation="rdb_bgsave") == 0
    assert value("pulsecal_redis_memory_used_bytes", redis_node=primary) == 900
    assert value("pulsecal_redis_memory_max_bytes", redis_node=primary) == 1000


def test_the_databases_figures_as_series() -> None:
    text = render(postgres_families(STATS), openmetrics=False).decode()

    assert total(text, "pulsecal_postgres_connections", state="idle") == 7
    # The usual states are there at 0 when no backend is in them.
    assert total(text, "pulsecal_postgres_connections", state="idle_in_transaction_aborted") == 0
    assert total(text, "pulsecal_postgres_database_size_bytes") == 50_000_000
    assert total(text, "pulsecal_postgres_readings_partitions_ahead") == 7
    assert total(text, "pulsecal_postgres_readings_oldest_partition_timestamp_seconds") == (
        1_699_920_000
    )
    # Before the worker measured: the families, without series.
    empty = render(postgres_families(None), openmetrics=False).decode()
    assert "# TYPE pulsecal_postgres_connections gauge" in empty
    assert "\npulsecal_postgres_connections{" not in empty


async def _metrics(sidecar: Client, **headers: str) -> str:
    response = await sidecar.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    return await response.text()


async def test_beside_a_worker_the_exposition_has_them_and_passes_promtool(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    await _fill_partitions(redis, keys)
    pod = sidecar_settings.pod
    beat = worker_heartbeat(pod, {"0/3": 3, "1/3": 4, "2/3": 0}, STATS)
    await redis.set(keys.heartbeat(pod), encode_heartbeat(beat))
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    async def collected() -> bool:
        return total(await _metrics(sidecar), "pulsecal_redis_up") == 1

    await eventually(collected)
    text = await _metrics(sidecar)
    code, output = await promtool_check(text)

    assert code == 0, output + text
    assert total(text, "pulsecal_readings_stream_length", partition="0/3") == 5
    assert total(text, "pulsecal_readings_group_lag", partition="0/3", group=PERSIST_GROUP) == 2
    assert total(text, "pulsecal_readings_group_pending", partition="0/3") == 2
    assert total(text, "pulsecal_readings_dead_letters", partition="1/3") == 2
    assert total(text, "pulsecal_redis_aof_enabled", redis_node="127.0.0.1:6379") in (0, 1)
    assert total(text, "pulsecal_dependency_collect_commands") == 10
    assert total(text, "pulsecal_postgres_connections", state="active") == 2
    assert total(text, "pulsecal_postgres_readings_partitions_ahead") == 7
    openmetrics = await _metrics(sidecar, Accept="application/openmetrics-text")
    assert "pulsecal_redis_evicted_keys_total{" in openmetrics
    assert openmetrics.endswith("# EOF\n")


async def test_beside_the_service_or_when_turned_off_there_are_none(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    await redis.set(keys.heartbeat(pod), encode_heartbeat(heartbeat(pod)))
    beside_service = await aiohttp_client(create_app(sidecar_settings))
    await eventually(lambda: _up(beside_service))
    assert "pulsecal_redis_" not in await _metrics(beside_service)

    await redis.set(keys.heartbeat(pod), encode_heartbeat(worker_heartbeat(pod, {"0/1": 0})))
    off = dataclasses.replace(sidecar_settings, dependency_metrics=False)
    turned_off = await aiohttp_client(create_app(off))
    await eventually(lambda: _up(turned_off))
    text = await _metrics(turned_off)
    assert "pulsecal_redis_" not in text
    assert "pulsecal_postgres_" not in text


async def _up(sidecar: Client) -> bool:
    return total(await _metrics(sidecar), "pulsecal_service_up") == 1


def test_the_cluster_client_still_reads_its_slot_map_as_the_collector_asks_it() -> None:
    # sidecar/dependencies.py re-reads a cluster's slot map through the client's
    # ``nodes_manager.initialize()`` (an attribute redis-py does not document): this trips
    # when a redis-py upgrade moves it.
    client = RedisCluster(host="127.0.0.1", port=1)
    assert inspect.iscoroutinefunction(client.nodes_manager.initialize)
