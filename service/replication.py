"""What an ack promises, and whether Redis can keep that promise now.

With ``ACK_MODE=primary`` a batch is acknowledged once the Redis primary has it in memory
(and, with the persistence the deployment runs, on its disk: docs/operations.md). With
``ACK_MODE=replicated`` each write also waits (``WAIT``) for ``ACK_REPLICAS`` replicas to
have it, at most ``ACK_TIMEOUT``; a write they do not confirm in time is answered 503 with
``Retry-After`` and not acknowledged (``service/store.py``).

The health checker reads ``INFO replication`` every round (``replication_check``): the role
of the Redis the service writes to, its replicas online and their lag. Readiness shows it;
in replicated mode it fails while fewer replicas than required are online, and meanwhile
the writer answers 503 at once instead of waiting out ``ACK_TIMEOUT`` per write. The
heartbeat carries the same figures to the sidecar.

On a Redis Cluster each partition's writes go to the primary serving its slot: the check
reads every primary's ``INFO replication`` and tells each partition's writer about its own
primary; the figures shown are the worst of them (fewest replicas, largest lag). With
several partitions the check fails only while none can acknowledge: a shard short of
replicas (or down) refuses its own partitions' batches, and the pod stays ready for the
others.
"""

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from shared.health import Check, CheckFailedError
from shared.keys import PartitionKeys
from shared.redisclient import RedisClient

from .partitions import PartitionedWriter

__all__ = ("PRIMARY", "REPLICATED", "Replication", "replication_check")

PRIMARY = "primary"
REPLICATED = "replicated"


@dataclass(slots=True)
class Replication:
    """The last look at the Redis the service writes to (nothing yet: role "unknown")."""

    mode: str
    required: int  # replicas an ack waits for; 0 in primary mode
    role: str = "unknown"
    replicas_online: int = 0
    # The largest lag of an online replica, seconds since its last acknowledgement (Redis
    # counts whole seconds).
    lag_seconds: int = 0


def _replicas(info: Mapping[str, Any]) -> tuple[bool, int, int]:
    """(a primary, replicas online, their largest lag) of one ``INFO replication``."""
    replicas = [
        value
        for name, value in info.items()
        if name.startswith("slave") and name[5:].isdigit() and isinstance(value, dict)
    ]
    online = [r for r in replicas if r.get("state") == "online"]
    lag = max((int(r.get("lag", 0)) for r in online), default=0)
    return info.get("role") == "master", len(online), lag


def replication_check(
    redis: RedisClient,
    writer: PartitionedWriter,
    state: Replication,
    partitions: tuple[PartitionKeys, ...] = (),
) -> Check:
    async def look() -> tuple[bool, int, int, int]:
        """(primary, replicas online, their lag, partitions that cannot ack) as seen now."""
        if not isinstance(redis, RedisCluster):
            primary, online, lag = _replicas(await redis.info("replication"))
            writer.replicas_online = online
            cannot = not primary or online < state.required
            return primary, online, lag, len(writer.writers) if cannot else 0
        # Each primary on its own: one down (a failover under way) is its partitions' loss.
        primaries = redis.get_primaries()
        answers = await asyncio.gather(
            *(redis.info("replication", target_nodes=node) for node in primaries),
            return_exceptions=True,
        )
        infos = {
            node.name: answer
            for node, answer in zip(primaries, answers, strict=True)
            if isinstance(answer, dict)
        }
        all_primary = True
        fewest, lag, short = -1, 0, 0
        for partition, one in zip(partitions, writer.writers, strict=True):
            node = redis.get_node_from_key(partition.readings)
            info = infos.get(node.name) if node is not None else None
            if info is None:
                one.replicas_online = None
                short += 1
                continue
            primary, online, node_lag = _replicas(info)
            one.replicas_online = online
            all_primary = all_primary and primary
            fewest = online if fewest < 0 else min(fewest, online)
            lag = max(lag, node_lag)
            short += int(not primary or online < state.required)
        return all_primary, max(fewest, 0), lag, short

    async def check() -> Mapping[str, Any]:
        primary, online, lag, short = await look()
        state.role = "primary" if primary else "replica"
        state.replicas_online = online
        state.lag_seconds = lag
        details: dict[str, Any] = {
            "ackMode": state.mode,
            "role": state.role,
            "replicasOnline": state.replicas_online,
            "replicasRequired": state.required,
            "lagSeconds": state.lag_seconds,
        }
        count = len(writer.writers)
        if count > 1:
            # Partitions whose primary cannot ack now (refused 503 meanwhile); the pod stays
            # ready while any partition can.
            details["partitionsShort"] = short
            details["partitions"] = count
            if short < count:
                return details
        if state.role != "primary":
            raise CheckFailedError("the Redis the service writes to is a replica")
        if state.replicas_online < state.required:
            raise CheckFailedError(
                f"acks wait for {state.required} replicas, {state.replicas_online} online"
            )
        if short:
            raise CheckFailedError("no partition's primary answers")
        return details

    return check
