"""The keys the system would leave behind, removed on the real Redis (``worker/cleaner.py``):
the keys of gone pods, the idle consumers of dead workers, the streams of retired layouts."""

import asyncio
import time
from typing import Any

import msgspec
from redis.asyncio import Redis

from shared.keys import Keys
from shared.readings import PERSIST_GROUP
from shared.runtime.heartbeat import HeartbeatPublisher
from tests.support.sidecar import heartbeat, http_record, xadd_batch
from worker.cleaner import KeysCleaner
from worker.consumers import consumer_name

GRACE = 1.0


def cleaner(
    redis: Redis,
    keys: Keys,
    *,
    consumer: str = "cleaner-pod:00000000",
    grace: float = GRACE,
    groups: list[tuple[str, str]] | None = None,
    own_layout: int = 1,
    retired_delay: float = 0.0,
) -> KeysCleaner:
    return KeysCleaner(
        redis,
        keys,
        consumer=consumer,
        grace=grace,
        groups=lambda: groups or [],
        own_layout=own_layout,
        retired_delay=retired_delay,
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def leave_pod(redis: Redis, keys: Keys, pod: str, *, seen_ago: float) -> None:
    """A pod's telemetry stream and sidecar state, its heartbeat expired, last seen then."""
    await xadd_batch(redis, keys, pod, [http_record()])
    await redis.set(keys.sidecar_state(pod), b"state", ex=3600)
    await redis.zadd(keys.pods_seen, {pod: now_ms() - int(seen_ago * 1000)})


def publisher(redis: Redis, keys: Keys, pod: str) -> HeartbeatPublisher:
    return HeartbeatPublisher(
        redis,
        keys.heartbeat(pod),
        lambda: heartbeat(pod),
        interval=0.2,
        ttl=5,
        seen=(keys.pods_seen, pod),
    )


async def existing(redis: Redis, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if await redis.exists(name)]


async def test_a_heartbeat_records_its_pod(redis: Redis, keys: Keys) -> None:
    before = now_ms()
    await publisher(redis, keys, "pod-a").publish()
    assert await redis.exists(keys.heartbeat("pod-a"))
    score = await redis.zscore(keys.pods_seen, "pod-a")
    assert score is not None
    assert before <= score <= now_ms()


async def test_a_gone_pods_keys_go_and_a_live_pods_stay(redis: Redis, keys: Keys) -> None:
    await leave_pod(redis, keys, "gone", seen_ago=GRACE + 5)
    await leave_pod(redis, keys, "recent", seen_ago=GRACE / 10)  # a restart's pause, say
    await leave_pod(redis, keys, "live", seen_ago=0)
    await publisher(redis, keys, "live").publish()
    # Seen long ago by the registry, but its heartbeat is there (the ZADD of its last one
    # failed): alive.
    await leave_pod(redis, keys, "stale", seen_ago=GRACE + 5)
    await redis.set(keys.heartbeat("stale"), b"{}", ex=5)

    removed = await cleaner(redis, keys).remove_gone_pods()

    assert removed == 1
    assert await existing(redis, keys.pod_keys("gone")) == []
    assert await redis.zscore(keys.pods_seen, "gone") is None
    for pod in ("recent", "live", "stale"):
        assert await redis.zscore(keys.pods_seen, pod) is not None
        assert await redis.exists(keys.telemetry(pod)), pod
        assert await redis.exists(keys.sidecar_state(pod)), pod


async def test_two_cleaners_at_once_remove_each_key_once(redis: Redis, keys: Keys) -> None:
    gone = [f"gone-{i}" for i in range(30)]
    for pod in gone:
        await leave_pod(redis, keys, pod, seen_ago=GRACE + 5)
    await leave_pod(redis, keys, "live", seen_ago=0)
    await publisher(redis, keys, "live").publish()
    first, second = cleaner(redis, keys), cleaner(redis, keys)

    # Both rounds at once, the lease left out: correctness must not depend on it.
    await asyncio.gather(first.remove_gone_pods(), second.remove_gone_pods())

    assert first.pods_removed + second.pods_removed == len(gone)
    assert first.keys_removed + second.keys_removed == 2 * len(gone)  # stream and state
    for pod in gone:
        assert await existing(redis, keys.pod_keys(pod)) == []
    assert await redis.zrange(keys.pods_seen, 0, -1) == [b"live"]
    assert await existing(redis, keys.pod_keys("live")) == list(keys.pod_keys("live"))


async def test_one_round_at_a_time_by_the_lease(redis: Redis, keys: Keys) -> None:
    cleaners = [cleaner(redis, keys, consumer=f"w{i}:0000000{i}") for i in range(5)]
    ran = await asyncio.gather(*(c.run_once() for c in cleaners))
    assert sorted(ran) == [False] * 4 + [True]


async def test_a_pod_that_comes_back_during_the_round_is_kept(redis: Redis, keys: Keys) -> None:
    await leave_pod(redis, keys, "back", seen_ago=GRACE + 5)
    worker = cleaner(redis, keys)
    remove_pod = worker._remove_pod

    async def then_back(**kwargs: Any) -> Any:
        # The pod's keys went; before its entry goes, the pod (same name) is back.
        result = await remove_pod(**kwargs)
        await publisher(redis, keys, "back").publish()
        return result

    worker._remove_pod = then_back  # type: ignore[method-assign]
    assert await worker.remove_gone_pods() == 0
    assert await redis.exists(keys.heartbeat("back"))
    score = await redis.zscore(keys.pods_seen, "back")
    assert score is not None
    assert score > now_ms() - 5000
    # The next rounds leave it alone: it is seen again.
    assert await cleaner(redis, keys).remove_gone_pods() == 0
    assert await redis.zscore(keys.pods_seen, "back") is not None


async def test_dead_consumers_with_nothing_pending_go(redis: Redis, keys: Keys) -> None:
    stream = keys.readings
    await redis.xgroup_create(stream, PERSIST_GROUP, id="0", mkstream=True)
    for i in range(4):
        await redis.xadd(stream, {"n": i})
    boot = "ab" * 16
    dead_busy = consumer_name("dead-busy", boot)  # holds entries: never deleted
    dead_idle = consumer_name("dead-idle", boot)  # nothing pending, its process gone
    restarted = consumer_name("alive", "cd" * 16)  # its pod lives on in another process
    alive = consumer_name("alive", boot)
    await redis.xreadgroup(PERSIST_GROUP, dead_busy, {stream: ">"}, count=2)
    for name in (dead_idle, restarted, alive):
        await redis.xgroup_createconsumer(stream, PERSIST_GROUP, name)
    live = heartbeat("alive")
    live.boot_id = boot
    await redis.set(keys.heartbeat("alive"), msgspec_json(live), ex=30)
    await asyncio.sleep(GRACE + 0.1)
    newcomer = consumer_name("newcomer", boot)  # idle for less than the grace
    await redis.xgroup_createconsumer(stream, PERSIST_GROUP, newcomer)

    worker = cleaner(redis, keys, groups=[(stream, PERSIST_GROUP), (keys.analysis_jobs, "x")])
    assert await worker.remove_idle_consumers() == 2

    names = {c["name"].decode() for c in await redis.xinfo_consumers(stream, PERSIST_GROUP)}
    assert names == {dead_busy, alive, newcomer}
    pending = await redis.xpending(stream, PERSIST_GROUP)
    assert pending["pending"] == 2
    # Once a live worker has taken its entries, the dead one goes too.
    await redis.xclaim(
        stream, PERSIST_GROUP, alive, 0, [e for e, _ in await entries(redis, stream)]
    )
    await asyncio.sleep(GRACE + 0.1)
    await redis.set(keys.heartbeat("alive"), msgspec_json(live), ex=30)
    assert await worker.remove_idle_consumers() == 2  # dead-busy, and newcomer now
    names = {c["name"].decode() for c in await redis.xinfo_consumers(stream, PERSIST_GROUP)}
    assert names == {alive}


async def test_a_consumer_given_entries_meanwhile_is_kept(redis: Redis, keys: Keys) -> None:
    stream = keys.readings
    await redis.xgroup_create(stream, PERSIST_GROUP, id="0", mkstream=True)
    await redis.xadd(stream, {"n": 1})
    name = consumer_name("late", "ef" * 16)
    await redis.xgroup_createconsumer(stream, PERSIST_GROUP, name)
    await asyncio.sleep(GRACE + 0.1)
    worker = cleaner(redis, keys, groups=[(stream, PERSIST_GROUP)])
    delete = worker._delete_consumer

    async def after_a_read(**kwargs: Any) -> Any:
        # Between the look at the group and the deletion, the consumer takes an entry.
        await redis.xreadgroup(PERSIST_GROUP, name, {stream: ">"}, count=1)
        return await delete(**kwargs)

    worker._delete_consumer = after_a_read  # type: ignore[method-assign]
    assert await worker.remove_idle_consumers() == 0
    consumers = await redis.xinfo_consumers(stream, PERSIST_GROUP)
    assert [(c["name"].decode(), c["pending"]) for c in consumers] == [(name, 1)]


async def test_the_streams_of_a_retired_layout_go_once_emptied(redis: Redis, keys: Keys) -> None:
    drained, busy = (p.readings for p in keys.partitions(2))
    for stream in (drained, busy):
        await redis.xgroup_create(stream, PERSIST_GROUP, id="0", mkstream=True)
        await redis.xadd(stream, {"n": 1})
    await persist_all(redis, drained, "w:00000000")
    await redis.xreadgroup(PERSIST_GROUP, "w:00000000", {busy: ">"}, count=10)  # pending
    await redis.zadd(keys.retired_layouts, {"2": now_ms() - 1000})
    worker = cleaner(redis, keys, retired_delay=0.2)
    await asyncio.sleep(0.3)

    assert await worker.remove_retired_streams() == 1
    assert not await redis.exists(drained)
    assert await redis.exists(busy)
    assert await redis.zscore(keys.retired_layouts, "2") is not None  # kept for the busy one

    await persist_all(redis, busy, "w:00000000")
    await asyncio.sleep(0.3)
    assert await worker.remove_retired_streams() == 1
    assert not await redis.exists(busy)
    assert await redis.zscore(keys.retired_layouts, "2") is None


async def test_a_retired_stream_read_lately_or_announced_again_stays(
    redis: Redis, keys: Keys
) -> None:
    stream = keys.partitions(3)[0].readings
    await redis.xgroup_create(stream, PERSIST_GROUP, id="0", mkstream=True)
    await redis.zadd(keys.retired_layouts, {"3": now_ms() - 1000, "4": now_ms() - 1000})
    # A worker read it lately (its own INGEST_PARTITIONS, say).
    await redis.xadd(stream, {"n": 1})
    await persist_all(redis, stream, "w:00000000")
    worker = cleaner(redis, keys, retired_delay=5.0)
    await redis.zadd(keys.retired_layouts, {"3": now_ms() - 6000})
    assert await worker.remove_retired_streams() == 0
    assert await redis.exists(stream)
    assert await redis.zscore(keys.retired_layouts, "3") is not None
    # A service writes layout 3 again (a late writer, its announcement): not retired.
    await redis.zadd(keys.ingest_layouts, {"3": now_ms()})
    assert await worker.remove_retired_streams() == 0
    assert await redis.exists(stream)
    assert await redis.zscore(keys.retired_layouts, "3") is None


async def test_a_retired_stream_with_entries_and_no_group_stays(redis: Redis, keys: Keys) -> None:
    # A late write recreated the stream after it was deleted: it waits to be consumed.
    stream = keys.partitions(2)[0].readings
    await redis.xadd(stream, {"n": 1})
    await redis.zadd(keys.retired_layouts, {"2": now_ms() - 1000})
    assert await cleaner(redis, keys, retired_delay=0.1).remove_retired_streams() == 0
    assert await redis.xlen(stream) == 1


# ---------------------------------------------------------------------- helpers


def msgspec_json(value: Any) -> bytes:
    return msgspec.json.encode(value)


async def entries(redis: Redis, stream: str) -> list[tuple[bytes, Any]]:
    result: list[tuple[bytes, Any]] = await redis.xrange(stream)
    return result


async def persist_all(redis: Redis, stream: str, consumer: str) -> None:
    """Every entry delivered to ``consumer`` and acknowledged."""
    await redis.xreadgroup(PERSIST_GROUP, consumer, {stream: ">"}, count=100)
    ids = [entry_id for entry_id, _ in await entries(redis, stream)]
    if ids:
        await redis.xack(stream, PERSIST_GROUP, *ids)
