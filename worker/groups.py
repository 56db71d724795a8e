"""One consumer of a stream's consumer group: the entries it takes next.

Each read takes, in this order: the entries a dead consumer left pending (``DeadConsumers``,
looked for every ``DeadConsumers.CHECK_EVERY``, when the reader is given one), the entries
any consumer left unacknowledged for ``claim_idle`` (``XAUTOCLAIM``, about twice per
``claim_idle``), then new entries (``XREADGROUP``, blocking at most until the next idle
claim is due). An entry comes with how many times it has been delivered, this time
included, so its handler can give up on one that keeps failing. An entry trimmed or deleted
while pending is acknowledged when it is claimed: nothing is left of it to handle.

Nothing here acknowledges a delivered entry: the caller does, once it is handled; until
then it stays pending and another consumer claims it once idle.
"""

import asyncio
from dataclasses import dataclass
from typing import Any, cast

from loguru import logger
from redis.exceptions import ResponseError

from shared.redisclient import RedisClient

from .consumers import DeadConsumers

__all__ = ("Delivery", "GroupReader", "ensure_group", "stream_entries")


@dataclass(slots=True)
class Delivery:
    entry_id: bytes
    fields: dict[bytes, bytes]
    # Times delivered, this one included.
    deliveries: int


async def ensure_group(redis: RedisClient, stream: str, group: str) -> None:
    """Create the group (from the stream's first entry) unless it exists."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a one-stream ``XREAD``/``XREADGROUP`` reply (RESP2, bytes)."""
    if not reply:
        return []
    return cast(list[tuple[bytes, dict[bytes, bytes]]], reply[0][1])


class GroupReader:
    """``consumer`` of ``group`` on ``stream``, ``count`` entries at most per read.

    ``last_try``: the deliveries an idle entry is taken to have had when Redis no longer
    says (it was acknowledged meanwhile): its handler's last try, not one past it.
    ``block_ms``: the longest a read of new entries waits (at most until a claim is due).
    Redis errors are the caller's to retry.
    """

    def __init__(
        self,
        redis: RedisClient,
        stream: str,
        group: str,
        *,
        consumer: str,
        count: int,
        claim_idle: float,
        last_try: int,
        block_ms: int | None = None,
        dead_consumers: DeadConsumers | None = None,
        label: str,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._count = count
        self._claim_idle_ms = max(1, int(claim_idle * 1000))
        self._claim_every = min(max(claim_idle / 2, 0.05), 5.0)
        claim_every_ms = max(1, int(self._claim_every * 1000))
        self._block_ms = claim_every_ms if block_ms is None else min(block_ms, claim_every_ms)
        self._last_try = last_try
        self._dead_consumers = dead_consumers
        self._label = label
        self._claim_cursor = b"0-0"
        self._next_claim = 0.0
        self._next_dead_check = 0.0
        self.group_ready = False
        # Entries taken over from other consumers (dead, or idle too long).
        self.claimed = 0

    async def ensure_group(self) -> None:
        await ensure_group(self._redis, self._stream, self._group)
        self.group_ready = True

    async def read(self) -> list[Delivery]:
        try:
            return await self._read()
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
        # The stream is gone with its group (a retired layout's, deleted once emptied:
        # worker/cleaner.py) while this reader still had it: the group is created anew, from
        # the first entry a late write may have added since.
        logger.info("worker: {} group of {} created again", self._group, self._stream)
        await self.ensure_group()
        return []

    async def _read(self) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        if self._dead_consumers is not None and loop.time() >= self._next_dead_check:
            # A dead consumer's entries first, before newer ones: they are older.
            taken = await self._dead_consumers.claim(count=self._count)
            if taken:
                self.claimed += len(taken)
                logger.info(
                    "worker: claimed {} {} entries of a dead consumer", len(taken), self._label
                )
                return [Delivery(entry_id, fields, n) for entry_id, fields, n in taken]
            self._next_dead_check = loop.time() + DeadConsumers.CHECK_EVERY
        if loop.time() >= self._next_claim:
            claimed = await self._claim_idle()
            if claimed:
                return claimed
            self._next_claim = loop.time() + self._claim_every
        reply = await self._redis.xreadgroup(
            self._group,
            self._consumer,
            {self._stream: ">"},
            count=self._count,
            block=self._block_ms,
        )
        return [Delivery(entry_id, fields, 1) for entry_id, fields in stream_entries(reply)]

    async def _claim_idle(self) -> list[Delivery]:
        reply = await self._redis.xautoclaim(
            self._stream,
            self._group,
            self._consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=self._count,
        )
        cursor, claimed, deleted = reply[0], reply[1], (reply[2] if len(reply) > 2 else [])
        self._claim_cursor = cursor
        if deleted:
            # Trimmed or deleted while pending: nothing left to handle.
            await self._redis.xack(self._stream, self._group, *deleted)
        taken = [(entry_id, fields) for entry_id, fields in claimed if fields is not None]
        if not taken:
            return []
        self.claimed += len(taken)
        pending = await self._redis.xpending_range(
            self._stream,
            self._group,
            min=taken[0][0],
            max=taken[-1][0],
            count=len(taken) * 2,
            consumername=self._consumer,
        )
        deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        logger.info("worker: claimed {} pending {} entries", len(taken), self._label)
        return [
            Delivery(entry_id, fields, deliveries.get(entry_id, self._last_try))
            for entry_id, fields in taken
        ]
