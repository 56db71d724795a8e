"""Per-request telemetry records, written to Redis for the sidecar, and the process figures
its heartbeat reports (the heartbeat loop: ``shared/runtime/heartbeat.py``).

Recording a request costs one tuple and one list append. A background task writes the
buffer as one stream entry per interval (``XADD ... MAXLEN ~``); if Redis is away the
buffer is kept up to ``TELEMETRY_BUFFER_MAX`` records, and everything beyond is dropped and
counted. The count travels with every batch and heartbeat.
"""

import asyncio
import contextlib
import math
import os
import time
import uuid

from loguru import logger

from .keys import Keys
from .redisclient import REDIS_ERRORS, RedisClient
from .telemetry import BATCH_FIELD, Record, TelemetryBatch, encode_batch

__all__ = ("LoopLagMonitor", "Telemetry", "process_memory")

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_memory() -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes, from /proc.

    Python has no single heap figure; resident memory not backed by files (the allocator's
    arenas, malloc's heap, thread stacks) is what grows when the process leaks.
    """
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
    except OSError:
        return 0, 0
    resident, shared = int(fields[1]), int(fields[2])
    return resident * _PAGE_SIZE, (resident - shared) * _PAGE_SIZE


class Telemetry:
    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        pod: str,
        *,
        buffer_max: int,
        stream_maxlen: int,
        flush_interval: float,
        stream_ttl: int = 0,
    ) -> None:
        self._redis = redis
        self._stream = keys.telemetry(pod)
        self._buffer_max = buffer_max
        self._stream_maxlen = stream_maxlen
        self._flush_interval = flush_interval
        self._stream_ttl = stream_ttl
        self._expire_refreshed = -math.inf
        self._buffer: list[Record] = []
        self.boot_id = uuid.uuid4().hex
        self.dropped = 0
        self._failing = False

    def record(self, entry: Record) -> None:
        if len(self._buffer) < self._buffer_max:
            self._buffer.append(entry)
        else:
            self.dropped += 1

    async def flush(self) -> None:
        records = self._buffer
        if not records:
            return
        self._buffer = []
        batch = TelemetryBatch(self.boot_id, time.time_ns() // 1_000_000, self.dropped, records)
        try:
            await self._redis.xadd(
                self._stream,
                {BATCH_FIELD: encode_batch(batch)},
                maxlen=self._stream_maxlen,
                approximate=True,
            )
        except REDIS_ERRORS as e:
            # Keep the records for the next attempt, the newest dropped beyond the bound.
            kept = records + self._buffer
            if len(kept) > self._buffer_max:
                self.dropped += len(kept) - self._buffer_max
                del kept[self._buffer_max :]
            self._buffer = kept
            if not self._failing:
                logger.warning("telemetry flush failed, buffering: {}", e)
            self._failing = True
            return
        if self._failing:
            logger.info("telemetry flush recovered")
        self._failing = False
        # A replaced pod's stream must not stay forever: it expires once nothing is written
        # to it for the TTL (long enough for any sidecar outage), refreshed once a minute.
        now = time.monotonic()
        if self._stream_ttl and now - self._expire_refreshed > 60:
            self._expire_refreshed = now
            with contextlib.suppress(*REDIS_ERRORS):
                await self._redis.expire(self._stream, self._stream_ttl)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                async with asyncio.timeout(max(self._flush_interval * 10, 2.0)):
                    await self.flush()
            except TimeoutError:
                pass  # records stay buffered; the next round tries again


class LoopLagMonitor:
    """How late the event loop wakes a sleeping task: the worst lag since the last read."""

    def __init__(self, *, interval: float = 0.25) -> None:
        self._interval = interval
        self._worst = 0.0

    def take(self) -> float:
        worst, self._worst = self._worst, 0.0
        return worst

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            self._worst = max(self._worst, loop.time() - expected)
