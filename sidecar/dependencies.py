"""Redis's health and the readings streams', read by the sidecar beside a worker, and the
database's figures the worker carries in its heartbeat: the families of ``/metrics`` that say
how the dependencies are doing (docs/sidecar-and-metrics.md, "Dependencies").

Who collects: the sidecar whose process is a worker (known from its heartbeat, and
remembered for the sidecar's life, so the figures stay while the worker is down). Every
worker pod's sidecar exports the same figures, labelled with its own ``pod``: aggregate with
``max by``, never a sum.

What one collection costs is fixed: one ``INFO`` of six sections per Redis node (every
primary and replica of a cluster, each asked on its own with ``target_nodes``), and per
readings partition of the layouts the worker consumes (the names of its heartbeat's
``partition_backlog``) an ``XLEN`` and an ``XINFO GROUPS`` of its stream and an ``XLEN`` of
its dead letters, pipelined. No ``KEYS`` or ``SCAN``, nothing per device. A collection
serves the scrapes of the next ``DEPENDENCY_METRICS_CACHE`` seconds; scrapes arriving while
one runs share it.
"""

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import RedisCluster

from shared.keys import Keys, PartitionKeys
from shared.partitions import MAX_PARTITIONS
from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.telemetry import Heartbeat, PostgresStats, WorkerHeartbeat

from .exposition import Family, label_text

__all__ = (
    "INFO_SECTIONS",
    "REFUSALS",
    "Collection",
    "DependencyCollector",
    "StreamFigures",
    "consumed_layouts",
    "postgres_families",
    "redis_families",
)

_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *REDIS_ERRORS)
INFO_SECTIONS = ("clients", "memory", "persistence", "stats", "replication", "errorstats")
# The error replies (``INFO errorstats``) that mean Redis refused a write: out of memory
# under noeviction, a failed background save with stop-writes-on-bgsave-error, too few
# replicas for min-replicas-to-write, a write sent to a replica. Each exported, 0 until seen.
REFUSALS = ("OOM", "MISCONF", "NOREPLICAS", "READONLY")
# Background persistence operations and the INFO field of each one's last status.
_PERSISTENCE = {
    "aof_write": "aof_last_write_status",
    "aof_rewrite": "aof_last_bgrewrite_status",
    "rdb_bgsave": "rdb_last_bgsave_status",
}
# Postgres backend states, each exported (0 when none), others as they appear.
_PG_STATES = ("active", "idle", "idle_in_transaction", "idle_in_transaction_aborted")


@dataclass(frozen=True, slots=True)
class StreamFigures:
    partition: str  # "<index>/<count>"
    length: int
    dead_letters: int
    # (group, lag, pending); lag as Redis reports it, the stream's length when it cannot
    # tell (entries deleted past the group's position), as the worker's janitor counts it.
    groups: tuple[tuple[str, int, int], ...] = ()


@dataclass(slots=True)
class Collection:
    at: float = 0.0  # time.monotonic() of its end
    partitions: tuple[str, ...] = ()
    # node name ("host:port") -> its INFO, None when it did not answer.
    nodes: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    streams: list[StreamFigures] = field(default_factory=list)
    streams_ok: bool = False
    duration_s: float = 0.0
    commands: int = 0


def consumed_layouts(heartbeat: WorkerHeartbeat) -> tuple[int, ...]:
    """The partition counts of the layouts a worker measures (its ``partition_backlog``'s
    names, ``"<index>/<count>"``); none from a worker before partitions."""
    counts: set[int] = set()
    for name in heartbeat.partition_backlog:
        _, _, count = name.partition("/")
        if count.isdigit() and 1 <= int(count) <= MAX_PARTITIONS:
            counts.add(int(count))
    return tuple(sorted(counts))


def _node_name(redis: RedisClient) -> str:
    kwargs = redis.connection_pool.connection_kwargs if not isinstance(redis, RedisCluster) else {}
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


class DependencyCollector:
    """Collects Redis's figures when asked, at most once per ``max_age`` seconds."""

    def __init__(self, redis: RedisClient, keys: Keys, *, max_age: float, timeout: float) -> None:
        self._redis = redis
        self._keys = keys
        self._max_age = max_age
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self.last: Collection | None = None
        self.beside_worker = False
        self.layouts: tuple[int, ...] = ()
        self.collections = 0
        self.failures = 0
        self._stale_map = False

    def follow(self, heartbeat: Heartbeat | None) -> bool:
        """Take what the worker's heartbeat says (its program, its layouts); whether to
        collect. The last known layouts stay while the heartbeat is missing."""
        if isinstance(heartbeat, WorkerHeartbeat):
            self.beside_worker = True
            layouts = consumed_layouts(heartbeat)
            if layouts:
                self.layouts = layouts
        return self.beside_worker

    def _partitions(self) -> list[PartitionKeys]:
        return [p for count in self.layouts for p in self._keys.partitions(count)]

    async def collect(self) -> Collection:
        partitions = self._partitions()
        names = tuple(p.partition.name for p in partitions)
        async with self._lock:
            last = self.last
            now = time.monotonic()
            if last is not None and last.partitions == names and now - last.at < self._max_age:
                return last
            started = time.perf_counter()
            collection = Collection(partitions=names)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._collect(collection, partitions)
            except _ERRORS:
                self.failures += 1
            collection.duration_s = time.perf_counter() - started
            collection.at = time.monotonic()
            self.collections += 1
            self.last = collection
            return collection

    async def _collect(self, into: Collection, partitions: Sequence[PartitionKeys]) -> None:
        # INFO and the streams apart: one failing leaves the other's figures.
        outcomes = await asyncio.gather(
            self._infos(into), self._streams(into, partitions), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, _ERRORS):
                self.failures += 1
            elif isinstance(outcome, BaseException):
                raise outcome

    async def _infos(self, into: Collection) -> None:
        redis = self._redis
        if not isinstance(redis, RedisCluster):
            name = _node_name(redis)
            into.nodes[name] = None
            into.commands += 1
            into.nodes[name] = await redis.info(*INFO_SECTIONS)
            return
        nodes = redis.get_nodes()
        if not nodes:  # a client that has not read the slot map yet
            await redis.initialize()
            nodes = redis.get_nodes()
        elif self._stale_map:
            # A replica the primaries name is missing from the slot map (CLUSTER SLOTS
            # leaves out a replica until it has replicated something): read it again, through
            # ``nodes_manager`` (redis-py's own slot-map reader, undocumented; the client's
            # ``initialize`` reads it once only). Tripwire: tests/sidecar/test_dependencies.py.
            self._stale_map = False
            await redis.nodes_manager.initialize()
            nodes = redis.get_nodes()
        into.commands += len(nodes)
        # Each node on its own: one down is that node's series, not all of them.
        answers = await asyncio.gather(
            *(redis.info(*INFO_SECTIONS, target_nodes=node) for node in nodes),
            return_exceptions=True,
        )
        for node, answer in zip(nodes, answers, strict=True):
            into.nodes[node.name] = answer if isinstance(answer, dict) else None
        named = {address for info in into.nodes.values() if info for address, _ in _replicas(info)}
        self._stale_map = not named <= into.nodes.keys()

    async def _streams(self, into: Collection, partitions: Sequence[PartitionKeys]) -> None:
        if not partitions:
            into.streams_ok = True
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for p in partitions:
                pipe.xlen(p.readings)
                pipe.xinfo_groups(p.readings)
                pipe.xlen(p.readings_dead)
            into.commands += 3 * len(partitions)
            replies = await pipe.execute(raise_on_error=False)
        for i, p in enumerate(partitions):
            length, groups, dead = replies[3 * i : 3 * i + 3]
            if isinstance(length, Exception) or isinstance(dead, Exception):
                raise length if isinstance(length, Exception) else dead
            n = int(length)
            figures: list[tuple[str, int, int]] = []
            # XINFO GROUPS of a stream not created yet is an error reply: no groups.
            for group in groups if isinstance(groups, list) else []:
                lag = group.get("lag")
                name = group["name"]
                figures.append(
                    (
                        name.decode() if isinstance(name, bytes) else str(name),
                        n if lag is None else int(lag),
                        int(group.get("pending", 0)),
                    )
                )
            into.streams.append(StreamFigures(p.partition.name, n, int(dead), tuple(figures)))
        into.streams_ok = True


# --------------------------------------------------------------------------- exposition


def _node(name: str) -> str:
    return label_text((("redis_node", name),))


def _status_ok(value: object) -> int:
    return int(str(value) == "ok")


def _replicas(info: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for name, value in info.items():
        if name.startswith("slave") and name[5:].isdigit() and isinstance(value, dict):
            yield f"{value.get('ip', '?')}:{value.get('port', '?')}", value


def redis_families(collection: Collection) -> Iterator[Family]:
    """Every family, with series for the nodes and partitions collected."""
    up = Family(
        "pulsecal_redis_up",
        "gauge",
        "1 if the Redis node answered INFO at the last collection, by node.",
    )
    used = Family(
        "pulsecal_redis_memory_used_bytes", "gauge", "Memory Redis has allocated (used_memory)."
    )
    limit = Family(
        "pulsecal_redis_memory_max_bytes",
        "gauge",
        "Redis's maxmemory (0: no limit set).",
    )
    evicted = Family(
        "pulsecal_redis_evicted_keys",
        "counter",
        "Keys Redis evicted to stay under maxmemory (with noeviction: never).",
    )
    rejected = Family(
        "pulsecal_redis_rejected_connections",
        "counter",
        "Connections Redis refused (maxclients reached).",
    )
    refused = Family(
        "pulsecal_redis_error_replies",
        "counter",
        "Error replies Redis gave that refuse a write, by error prefix (INFO errorstats):"
        " OOM (over maxmemory), MISCONF (a failed save stops writes), NOREPLICAS"
        " (min-replicas-to-write unmet), READONLY (a write sent to a replica).",
    )
    clients = Family(
        "pulsecal_redis_connected_clients", "gauge", "Client connections open on the node."
    )
    blocked = Family(
        "pulsecal_redis_blocked_clients",
        "gauge",
        "Clients waiting in a blocking command (XREAD BLOCK and the like).",
    )
    aof = Family(
        "pulsecal_redis_aof_enabled",
        "gauge",
        "1 if the node writes an append-only file (appendonly yes).",
    )
    persistence = Family(
        "pulsecal_redis_persistence_ok",
        "gauge",
        "1 if the last background persistence operation succeeded, by operation: aof_write"
        " (the last AOF write or fsync), aof_rewrite (the last AOF rewrite), rdb_bgsave (the"
        " last RDB snapshot).",
    )
    primary = Family("pulsecal_redis_primary", "gauge", "1 if the node is a primary, 0 a replica.")
    replicas = Family(
        "pulsecal_redis_connected_replicas",
        "gauge",
        "Replicas connected to the node (a primary; 0 on a replica).",
    )
    replica_lag = Family(
        "pulsecal_redis_replica_lag_seconds",
        "gauge",
        "On a primary, each connected replica's lag (seconds since it last acknowledged),"
        " by replica address.",
    )
    link = Family(
        "pulsecal_redis_master_link_up",
        "gauge",
        "On a replica, 1 while its link to its primary is up (no series on a primary).",
    )
    last_io = Family(
        "pulsecal_redis_master_last_io_seconds",
        "gauge",
        "On a replica, seconds since it last heard from its primary (link down: since it"
        " went down).",
    )
    for name, info in sorted(collection.nodes.items()):
        node = _node(name)
        up.samples.append((node, int(info is not None)))
        if info is None:
            continue
        used.samples.append((node, int(info.get("used_memory", 0))))
        limit.samples.append((node, int(info.get("maxmemory", 0))))
        evicted.samples.append((node, int(info.get("evicted_keys", 0))))
        rejected.samples.append((node, int(info.get("rejected_connections", 0))))
        for error in REFUSALS:
            stat = info.get(f"errorstat_{error}")
            count = int(stat.get("count", 0)) if isinstance(stat, dict) else 0
            refused.samples.append((f'{node},error="{error}"', count))
        clients.samples.append((node, int(info.get("connected_clients", 0))))
        blocked.samples.append((node, int(info.get("blocked_clients", 0))))
        aof.samples.append((node, int(info.get("aof_enabled", 0))))
        for operation, status in _PERSISTENCE.items():
            persistence.samples.append(
                (f'{node},operation="{operation}"', _status_ok(info.get(status, "ok")))
            )
        is_primary = info.get("role") == "master"
        primary.samples.append((node, int(is_primary)))
        replicas.samples.append((node, int(info.get("connected_slaves", 0)) if is_primary else 0))
        if is_primary:
            for address, replica in _replicas(info):
                replica_lag.samples.append(
                    (f"{node},{label_text((('replica', address),))}", int(replica.get("lag", 0)))
                )
        else:
            link_up = info.get("master_link_status") == "up"
            link.samples.append((node, int(link_up)))
            since = "master_last_io_seconds_ago" if link_up else "master_link_down_since_seconds"
            last_io.samples.append((node, max(0, int(info.get(since, 0)))))
    yield from (up, used, limit, evicted, rejected, refused, clients, blocked, aof, persistence)
    yield from (primary, replicas, replica_lag, link, last_io)

    length = Family(
        "pulsecal_readings_stream_length",
        "gauge",
        "Entries in each readings partition's stream (XLEN), by partition.",
    )
    lag = Family(
        "pulsecal_readings_group_lag",
        "gauge",
        "Entries of each readings partition not yet delivered to its consumer group, by"
        " partition and group.",
    )
    pending = Family(
        "pulsecal_readings_group_pending",
        "gauge",
        "Entries of each readings partition delivered to its consumer group and not yet"
        " acknowledged, by partition and group.",
    )
    dead = Family(
        "pulsecal_readings_dead_letters",
        "gauge",
        "Entries in each readings partition's dead-letter stream (XLEN), by partition.",
    )
    for figures in collection.streams:
        partition = label_text((("partition", figures.partition),))
        length.samples.append((partition, figures.length))
        dead.samples.append((partition, figures.dead_letters))
        for group, group_lag, group_pending in figures.groups:
            labels = f"{partition},{label_text((('group', group),))}"
            lag.samples.append((labels, group_lag))
            pending.samples.append((labels, group_pending))
    yield from (length, lag, pending, dead)
    yield Family(
        "pulsecal_dependency_collect_duration_seconds",
        "gauge",
        "How long the last collection of Redis's figures took.",
        [("", round(collection.duration_s, 6))],
    )
    yield Family(
        "pulsecal_dependency_collect_commands",
        "gauge",
        "Redis commands the last collection of Redis's figures sent.",
        [("", collection.commands)],
    )


def postgres_families(stats: PostgresStats | None) -> Iterator[Family]:
    """The database's figures of a worker's heartbeat (no series before it measured them)."""
    connections = Family(
        "pulsecal_postgres_connections",
        "gauge",
        "Backends connected to this database (pg_stat_activity), by state.",
    )
    size = Family(
        "pulsecal_postgres_database_size_bytes", "gauge", "Size of the database (pg_database_size)."
    )
    ahead = Family(
        "pulsecal_postgres_readings_partitions_ahead",
        "gauge",
        "Daily partitions of readings that exist for days after today (UTC).",
    )
    oldest = Family(
        "pulsecal_postgres_readings_oldest_partition_timestamp_seconds",
        "gauge",
        "Start (00:00 UTC) of the day of the oldest daily partition of readings kept.",
    )
    measured = Family(
        "pulsecal_postgres_measured_timestamp_seconds",
        "gauge",
        "When the worker last measured these figures.",
    )
    if stats is not None:
        states = dict.fromkeys(_PG_STATES, 0) | stats.connections
        for state, count in sorted(states.items()):
            connections.samples.append((label_text((("state", state),)), count))
        size.samples.append(("", stats.database_bytes))
        ahead.samples.append(("", stats.readings_partitions_ahead))
        if stats.readings_oldest_day_ms:
            oldest.samples.append(("", stats.readings_oldest_day_ms // 1000))
        measured.samples.append(("", stats.measured_ms / 1000))
    yield from (connections, size, ahead, oldest, measured)
