"""Every redis-py use outside the write path, on a real Redis Cluster (three primaries).

Each test puts its keys on more than one primary where the code touches several hash tags
(pods, rate-limit clients), and reads the result back from the node that owns the slot with
a plain client of that node alone: the cluster client cannot have kept it anywhere else.
"""

import asyncio
import time
import uuid

import msgspec
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis, RedisCluster

from service.ratelimit import Policy, RateLimiter, Window
from shared.health import redis_check
from shared.keys import Keys
from shared.redisclient import RedisClient, connect
from shared.reporting import Telemetry
from shared.runtime.heartbeat import HeartbeatPublisher
from shared.settings import ServiceSettings, SidecarSettings
from shared.telemetry import decode_heartbeat
from sidecar.consumer import TelemetryConsumer
from tests.support.cluster import ClusterNode, LocalCluster
from tests.support.settings import for_program
from tests.support.sidecar import heartbeat, http_record, xadd_batch
from worker.analysis_jobs import ANALYSIS_GROUP, WindowScheduler
from worker.consumers import DeadConsumers
from worker.groups import GroupReader
from worker.persist import Row


def on_node(node: ClusterNode) -> SyncRedis:
    return node.client()


def spread(cluster: LocalCluster, name: str, count: int, key: object) -> list[str]:
    """``count`` names ``name-<n>`` whose ``key(name)`` falls on ``count`` different primaries."""
    assert callable(key)
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < count:
        candidate = f"{name}-{n}"
        chosen.setdefault(cluster.primary_for_key(key(candidate)).port, candidate)
        n += 1
    return list(chosen.values())


def test_the_cluster_is_three_primaries_each_with_a_linked_replica(cluster: LocalCluster) -> None:
    primaries = cluster.primaries()
    assert len(primaries) == 3
    assert len(cluster.replicas()) == 3
    for primary in primaries:
        replica = cluster.replica_of(primary)
        assert cluster.info(replica, "replication")["master_link_status"] == "up"
    owners = {cluster.primary_for_slot(slot).port for slot in (0, 8000, 16383)}
    assert owners == {p.port for p in primaries}
    assert 6379 not in {node.port for node in cluster.nodes}
    assert cluster.cpu_seconds(primaries[0]) > 0


async def test_a_key_is_where_primary_for_key_says(
    cluster: LocalCluster, cluster_client: RedisClient
) -> None:
    assert isinstance(cluster_client, RedisCluster)
    for n in range(20):
        await cluster_client.set(f"k{n}", n)
    for n in range(20):
        with on_node(cluster.primary_for_key(f"k{n}")) as node:
            assert node.get(f"k{n}") == str(n).encode()
    cluster.flushall()
    assert await cluster_client.dbsize() == 0


async def test_health_check_pings_every_primary(cluster_client: RedisClient) -> None:
    # Each primary on its own (one down must not fail the check: tests/cluster/test_ingest.py).
    assert await redis_check(cluster_client)() == {"primariesUp": 3, "primaries": 3}
    assert isinstance(await cluster_client.ping(), bool)


async def test_telemetry_and_heartbeats_of_pods_land_in_their_own_slots(
    cluster: LocalCluster, cluster_client: RedisClient, keys: Keys
) -> None:
    pods = spread(cluster, "pod", 3, keys.telemetry)
    for pod in pods:
        telemetry = Telemetry(
            cluster_client,
            keys,
            pod,
            buffer_max=100,
            stream_maxlen=100,
            flush_interval=1.0,
            stream_ttl=60,
        )
        for _ in range(3):
            telemetry.record(http_record())
        await telemetry.flush()
        publisher = HeartbeatPublisher(
            cluster_client, keys.heartbeat(pod), lambda pod=pod: heartbeat(pod), interval=1, ttl=5
        )
        await publisher.publish()
    for pod in pods:
        with on_node(cluster.primary_for_key(keys.telemetry(pod))) as node:
            assert node.xlen(keys.telemetry(pod)) == 1
            assert 0 < node.ttl(keys.telemetry(pod)) <= 60
            raw = node.get(keys.heartbeat(pod))
            assert raw is not None
            assert decode_heartbeat(raw).pod == pod
            assert 0 < node.ttl(keys.heartbeat(pod)) <= 5
    assert len({cluster.primary_for_key(keys.heartbeat(p)).port for p in pods}) == 3


async def test_sidecar_reads_its_pod_in_one_transaction_and_resumes_from_its_checkpoint(
    cluster: LocalCluster, cluster_client: RedisClient, keys: Keys
) -> None:
    [pod] = spread(cluster, "sidecar-pod", 1, keys.telemetry)
    for n in range(5):
        await xadd_batch(cluster_client, keys, pod, [http_record()] * (n + 1))

    def consumer() -> TelemetryConsumer:
        return TelemetryConsumer(
            cluster_client,
            stream=keys.telemetry(pod),
            state_key=keys.sidecar_state(pod),
            max_series=100,
            read_count=2,
            block_ms=100,
            checkpoint_interval=0.1,
            state_ttl=600,
        )

    first = consumer()
    aggregator = await first.load()
    assert await first.read_once() == 2  # MULTI: XINFO STREAM + XREAD on the pod's slot
    assert first.backlog == 3
    assert await first.save()
    with on_node(cluster.primary_for_key(keys.sidecar_state(pod))) as node:
        assert node.exists(keys.sidecar_state(pod)) == 1
    assert aggregator.records == 1 + 2

    second = consumer()
    resumed = await second.load()
    assert resumed.records == 3
    while await second.read_once():
        pass
    assert resumed.records == sum(range(1, 6))
    assert second.backlog == 0
    # Nothing new: the blocking read waits on the pod's node and wakes on a new entry.
    waiting = asyncio.create_task(second._wait_for_entries())
    await asyncio.sleep(0.02)
    await xadd_batch(cluster_client, keys, pod, [http_record()])
    async with asyncio.timeout(2):
        await waiting
    assert await second.read_once() == 1


async def test_the_sidecar_app_serves_its_pods_metrics_from_the_cluster(
    cluster: LocalCluster,
    cluster_settings: ServiceSettings,
    cluster_client: RedisClient,
    keys: Keys,
    aiohttp_client: object,
) -> None:
    from sidecar.app import create_app

    settings = for_program(
        SidecarSettings,
        cluster_settings,
        sidecar_port=0,
        sidecar_block_ms=100,
        sidecar_checkpoint_interval=0.1,
    )
    pod = settings.pod
    await xadd_batch(cluster_client, keys, pod, [http_record()] * 7)
    await cluster_client.set(keys.heartbeat(pod), msgspec.json.encode(heartbeat(pod)), ex=10)
    assert callable(aiohttp_client)
    client = await aiohttp_client(create_app(settings))
    async with asyncio.timeout(10):
        while True:
            response = await client.get("/metrics")
            text = await response.text()
            if "http_requests_total{" in text and "} 7" in text:
                break
            await asyncio.sleep(0.05)
    with on_node(cluster.primary_for_key(keys.sidecar_state(pod))) as node:
        async with asyncio.timeout(5):
            while not node.exists(keys.sidecar_state(pod)):
                await asyncio.sleep(0.05)


async def test_api_rate_limits_hold_exactly_for_clients_on_every_primary(
    cluster: LocalCluster, cluster_client: RedisClient, keys: Keys
) -> None:
    policy = Policy("api", (Window("second", 5, 1.0), Window("minute", 8, 60.0)))
    limiter = RateLimiter(cluster_client, keys, fail_closed=True, timeout=2.0)
    clients = spread(cluster, "client", 3, lambda c: keys.rate_limit("api", "second", c))
    for client in clients:
        decisions = [await limiter.check(policy, client) for _ in range(7)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
        # Both windows' cells of one client share its slot (one script call, no CROSSSLOT).
        with on_node(cluster.primary_for_key(keys.rate_limit("api", "second", client))) as node:
            assert (
                node.exists(
                    keys.rate_limit("api", "second", client),
                    keys.rate_limit("api", "minute", client),
                )
                == 2
            )
    assert not limiter.degraded
    assert limiter.fallback_decisions == 0
    # The script is loaded on every primary once it is flushed from them.
    for node in cluster.primaries():
        with on_node(node) as plain:
            plain.script_flush()
    assert (await limiter.check(policy, "client-after-flush")).allowed


async def test_analysis_jobs_are_scheduled_once_per_window_and_consumed_by_the_group(
    cluster: LocalCluster, cluster_client: RedisClient, keys: Keys
) -> None:
    scheduler = WindowScheduler(cluster_client, keys, window=30.0, grace=0.0)
    devices = [f"dev-{n}" for n in range(4)]
    base = 1_764_000_000_000

    def rows(window: int) -> list[Row]:
        return [
            Row(b"1-0", 0, device_id=d, ts_ms=base + window * 30_000, samples=4, line=b"")
            for d in devices
        ]

    scheduler.note(rows(0))
    scheduler.note(rows(1))  # closes window 0 of every device
    assert await scheduler.flush() == 4
    # Another worker seeing the same windows schedules nothing again: the markers say so.
    other = WindowScheduler(cluster_client, keys, window=30.0, grace=0.0)
    other.note(rows(0))
    other.note(rows(1))
    assert await other.flush() == 0
    with on_node(cluster.primary_for_key(keys.analysis_jobs)) as node:
        assert node.xlen(keys.analysis_jobs) == 4

    assert isinstance(cluster_client, RedisCluster)
    reader = GroupReader(
        cluster_client,  # type: ignore[arg-type]
        keys.analysis_jobs,
        ANALYSIS_GROUP,
        consumer="w1:deadbeef",
        count=10,
        claim_idle=60.0,
        last_try=3,
        label="analysis",
    )
    await reader.ensure_group()
    await reader.ensure_group()  # BUSYGROUP is fine
    delivered = await reader.read()
    assert sorted(d.fields[b"device_id"].decode() for d in delivered) == devices
    await cluster_client.xack(keys.analysis_jobs, ANALYSIS_GROUP, delivered[0].entry_id)
    pending = await cluster_client.xpending(keys.analysis_jobs, ANALYSIS_GROUP)
    assert pending["pending"] == 3


async def test_dead_consumers_are_found_by_their_pods_heartbeats_on_other_primaries(
    cluster: LocalCluster, cluster_client: RedisClient, keys: Keys
) -> None:
    stream = f"{keys.prefix}{{ingest}}:test-stream"
    group = "persist"
    await cluster_client.xgroup_create(stream, group, id="0", mkstream=True)
    for n in range(6):
        await cluster_client.xadd(stream, {"n": n})
    pods = spread(cluster, "worker", 3, keys.heartbeat)
    live, replaced, gone = pods
    boot = "0123abcd"
    for pod, count in ((live, 2), (replaced, 2), (gone, 2)):
        await cluster_client.xreadgroup(group, f"{pod}:{boot}", {stream: ">"}, count=count)
    # The live pod's heartbeat is its process's; the replaced pod's belongs to a new one.
    for pod, boot_id in ((live, boot + "f" * 24), (replaced, "9" * 32)):
        beat = msgspec.structs.replace(heartbeat(pod), boot_id=boot_id)
        await cluster_client.set(keys.heartbeat(pod), msgspec.json.encode(beat), ex=30)
    await asyncio.sleep(0.01)
    dead = DeadConsumers(
        cluster_client, keys, stream, group, consumer=f"me:{uuid.uuid4().hex[:8]}", min_idle_ms=1
    )
    assert sorted(await dead.find()) == sorted([f"{replaced}:{boot}", f"{gone}:{boot}"])
    taken = await dead.claim(count=10)
    assert len(taken) == 2


async def test_a_traced_process_traces_its_cluster_client(cluster_client: RedisClient) -> None:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from shared.tracing import Tracing

    spans: list[ReadableSpan] = []

    class Collect(SpanExporter):
        def export(self, batch: object) -> SpanExportResult:
            assert isinstance(batch, list | tuple)
            spans.extend(batch)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Collect()))
    tracing = Tracing(provider=provider)
    tracing.instrument_redis(cluster_client)
    with provider.get_tracer("test").start_as_current_span("request"):
        await cluster_client.set("traced", "1")
    assert any(span.name in ("SET", "set") for span in spans), [s.name for s in spans]


async def test_a_plain_client_is_still_what_a_single_server_gets(cluster: LocalCluster) -> None:
    client = connect(cluster.url, cluster=False, connect_timeout=1, socket_timeout=1)
    try:
        assert isinstance(client, Redis)
        started = time.monotonic()
        await client.ping()
        assert time.monotonic() - started < 1
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("unix:///run/redis.sock", "redis:// or rediss://"),
        ("redis://127.0.0.1:7000/2", "database 0"),
    ],
)
def test_redis_cluster_refuses_urls_no_cluster_serves(url: str, message: str) -> None:
    from shared.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=message):
        load_settings({"REDIS_CLUSTER": "true", "REDIS_URL": url}, SidecarSettings)
    assert load_settings(
        {"REDIS_CLUSTER": "true", "REDIS_URL": "redis://h:7000/0"}, SidecarSettings
    )
