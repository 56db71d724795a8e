"""Dead consumers of a stream's group: their pending entries are claimed at once.

A worker's consumer is named ``{pod}:{boot}`` (``consumer_name``): its pod and the first 8
hex digits of its process's boot id, which the process's heartbeat (``heartbeat:{pod}``,
refreshed every ``HEARTBEAT_INTERVAL``, expiring after ``HEARTBEAT_TTL``) carries. A
consumer is dead when it has pending entries, has not touched the stream for ``min_idle_ms``
and its pod's heartbeat is gone or belongs to another process (the pod's worker restarted).
So a worker killed with ``kill -9`` has its entries taken over as soon as its heartbeat
expires, or at once by its own successor in the pod, instead of after they have idled for
``WORKER_CLAIM_IDLE``; the idle claim (``XAUTOCLAIM``) stays the fallback for anything
else. Claiming uses the same minimum idle time, so two workers finding the same dead
consumer do not take the entries from each other.
"""

from typing import cast

import msgspec

from shared.keys import Keys
from shared.redisclient import RedisClient

__all__ = ("DeadConsumers", "consumer_name", "dead")

_BOOT_DIGITS = 8
_HEX = frozenset("0123456789abcdef")


def consumer_name(pod: str, boot_id: str) -> str:
    return f"{pod}:{boot_id[:_BOOT_DIGITS]}"


def _pod_and_boot(name: str) -> tuple[str, str | None]:
    pod, sep, boot = name.rpartition(":")
    if sep and pod and len(boot) == _BOOT_DIGITS and set(boot) <= _HEX:
        return pod, boot
    return name, None


class _Boot(msgspec.Struct):
    boot_id: str = ""


_boot_decoder = msgspec.json.Decoder(_Boot)


def _alive(heartbeat: bytes | str | None, boot: str | None) -> bool:
    if heartbeat is None:
        return False
    if boot is None:
        return True
    try:
        return _boot_decoder.decode(heartbeat).boot_id.startswith(boot)
    except msgspec.DecodeError:
        return True  # a heartbeat of another format: not ours to judge


async def dead(redis: RedisClient, keys: Keys, names: list[str]) -> set[str]:
    """The consumers among ``names`` whose process's heartbeat is gone (or another's)."""
    if not names:
        return set()
    # A GET per pod, not one MGET: each heartbeat sits in its pod's hash slot, on a
    # cluster another node's for each pod; a pipeline sends each GET to its node.
    parsed = [_pod_and_boot(name) for name in names]
    pipe = redis.pipeline(transaction=False)
    for pod, _ in parsed:
        pipe.get(keys.heartbeat(pod))
    heartbeats = await pipe.execute()
    return {
        name
        for name, (_, boot), heartbeat in zip(names, parsed, heartbeats, strict=True)
        if not _alive(heartbeat, boot)
    }


# An entry of the stream, its fields, how many times it has been delivered (this one too).
Claimed = tuple[bytes, dict[bytes, bytes], int]


class DeadConsumers:
    """Finds the group's dead consumers and moves their pending entries to ``consumer``."""

    # Idle for at least this long (or WORKER_CLAIM_IDLE if shorter) before a consumer whose
    # heartbeat is gone counts as dead: long enough for a starting worker to publish its
    # first heartbeat, and for a claim by another worker to make its entries busy again.
    MIN_IDLE_MS = 1000
    CHECK_EVERY = 1.0  # seconds between looks at the group's consumers

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        stream: str,
        group: str,
        *,
        consumer: str,
        min_idle_ms: int,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._min_idle_ms = min_idle_ms

    async def find(self) -> list[str]:
        """The consumers that are dead and have entries pending."""
        candidates: list[str] = []
        for info in await self._redis.xinfo_consumers(self._stream, self._group):
            raw = info["name"]
            name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            if name == self._consumer or not int(info["pending"]):
                continue
            if int(info["idle"]) < self._min_idle_ms:
                continue
            candidates.append(name)
        gone = await dead(self._redis, self._keys, candidates)
        return [name for name in candidates if name in gone]

    async def claim(self, *, count: int) -> list[Claimed]:
        """Up to ``count`` entries of the first dead consumer that had some to give."""
        for name in await self.find():
            pending = await self._redis.xpending_range(
                self._stream, self._group, min="-", max="+", count=count, consumername=name
            )
            if not pending:
                continue
            deliveries = {p["message_id"]: int(p["times_delivered"]) + 1 for p in pending}
            claimed = cast(
                list[tuple[bytes, dict[bytes, bytes] | None]],
                await self._redis.xclaim(
                    self._stream,
                    self._group,
                    self._consumer,
                    min_idle_time=self._min_idle_ms,
                    message_ids=list(deliveries),
                ),
            )
            taken = [
                (entry_id, fields, deliveries.get(entry_id, 1))
                for entry_id, fields in claimed
                if fields is not None
            ]
            if taken:
                return taken
        return []
