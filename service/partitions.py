"""The readings partitions as the service writes them: one writer per partition.

A batch goes to its device's partition (``shared/partitions.py``); each partition has its
own ``ReadingsWriter`` (group commit, script, WAIT) on its own connection, which on a Redis
Cluster goes to the primary serving the partition's slot (``fastpath/resp.py``). So a write
is still one transaction on one node, and the partitions' writes travel side by side. With
one partition the writer is the single stream's, called directly.
"""

import asyncio
import time
from collections.abc import Callable, Sequence

from redis.crc import key_slot

from shared.keys import Keys, PartitionKeys
from shared.partitions import partition_index
from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.tasks import cancel_and_wait

from .store import BacklogMonitor, ReadingsWriter, Waiter, WriteResult

__all__ = ("PartitionedBacklog", "PartitionedWriter", "partition_slot")


def partition_slot(keys: PartitionKeys) -> int:
    """The hash slot of every key of the partition."""
    return key_slot(keys.readings.encode())


class PartitionedWriter:
    """The service's writer: ``ReadingsWriter``'s interface over one per partition."""

    def __init__(self, writers: Sequence[ReadingsWriter]) -> None:
        self.writers = tuple(writers)
        self._count = len(self.writers)
        # A device's writer, looked up once: devices write again and again.
        self._by_device: dict[str, ReadingsWriter] = {}
        if self._count == 1:
            # One partition: the writer's own methods, no lookup per batch.
            self.submit = self.writers[0].submit  # type: ignore[method-assign]
            self.submit_to = self.writers[0].submit_to  # type: ignore[method-assign]

    def writer_of(self, device_id: str) -> ReadingsWriter:
        writer = self._by_device.get(device_id)
        if writer is None:
            if len(self._by_device) >= 100_000:
                self._by_device.clear()
            writer = self._by_device[device_id] = self.writers[
                partition_index(device_id, self._count)
            ]
        return writer

    def submit(
        self, device_id: str, seq: int, payload: bytes, trace: bytes = b""
    ) -> asyncio.Future[WriteResult]:
        writer = self._by_device.get(device_id) or self.writer_of(device_id)
        return writer.submit(device_id, seq, payload, trace)

    def submit_to(
        self, device_id: str, seq: int, payload: bytes, waiter: Waiter, trace: bytes = b""
    ) -> None:
        writer = self._by_device.get(device_id) or self.writer_of(device_id)
        writer.submit_to(device_id, seq, payload, waiter, trace)

    async def run(self) -> None:
        tasks = [asyncio.create_task(w.run()) for w in self.writers]
        try:
            await asyncio.gather(*tasks)
        finally:
            await cancel_and_wait(tasks)

    async def drain(self) -> None:
        await asyncio.gather(*(w.drain() for w in self.writers))

    def _sum(self, name: str) -> int:
        return sum(getattr(w, name) for w in self.writers)

    @property
    def pending(self) -> int:
        return self._sum("pending")

    @property
    def stored(self) -> int:
        return self._sum("stored")

    @property
    def duplicates(self) -> int:
        return self._sum("duplicates")

    @property
    def failed(self) -> int:
        return self._sum("failed")

    @property
    def unreplicated(self) -> int:
        return self._sum("unreplicated")

    @property
    def batches(self) -> int:
        return self._sum("batches")

    @property
    def batches_per_entry(self) -> float:
        entries = sum(w.entries for w in self.writers)
        return sum(w.entry_batches for w in self.writers) / entries if entries else 1.0

    @property
    def healthy(self) -> bool:
        """Some partition's last write succeeded (or none has failed). One shard down
        (a failover under way) leaves the pod ready: its partitions' batches are answered
        503 with Retry-After while the others' go on, where an unready pod would refuse
        them all."""
        return any(w.healthy for w in self.writers)

    @property
    def failing(self) -> list[str]:
        """The partitions whose last write failed (``<index>/<count>``)."""
        return [f"{i}/{self._count}" for i, w in enumerate(self.writers) if not w.healthy]

    @property
    def last_failure(self) -> float:
        """When the last write failed while no partition was writing (0: never)."""
        return 0.0 if self.healthy else max(w.last_failure for w in self.writers)

    @property
    def replicas_online(self) -> int | None:
        """The fewest replicas any partition's primary has online (None: not looked yet)."""
        counts = [w.replicas_online for w in self.writers]
        known = [c for c in counts if c is not None]
        return min(known) if known else None

    @replicas_online.setter
    def replicas_online(self, count: int | None) -> None:
        for w in self.writers:
            w.replicas_online = count


class PartitionedBacklog:
    """The readings backlog over the service's partitions, in batches: the sum of each
    partition's (``BacklogMonitor``); over ``limit``, ingestion answers 503. Each look also
    says, in ``keys.ingest_layouts``, that this layout is written: the workers consume every
    layout said so lately (``worker/partitions.py``)."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        partitions: Sequence[PartitionKeys],
        *,
        limit: int,
        interval: float,
        batches_per_entry: Callable[[], float],
    ) -> None:
        self._redis = redis
        self._layouts = keys.ingest_layouts
        self._count = len(partitions)
        self._limit = limit
        self._interval = interval
        self.monitors = [
            BacklogMonitor(redis, p, batches_per_entry=batches_per_entry) for p in partitions
        ]
        self.backlog = 0
        self.exceeded = False
        self.announced = False

    async def announce(self) -> None:
        await self._redis.zadd(self._layouts, {str(self._count): time.time_ns() // 1_000_000})
        self.announced = True

    async def measure(self) -> int:
        await self.announce()
        measured = await asyncio.gather(*(m.measure() for m in self.monitors))
        for monitor, backlog in zip(self.monitors, measured, strict=True):
            monitor.backlog = backlog
        return sum(measured)

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(max(self._interval, 1.0)):
                    self.backlog = await self.measure()
                self.exceeded = self.backlog > self._limit
            except REDIS_ERRORS:
                pass  # the writer and the health checker report Redis trouble
            await asyncio.sleep(self._interval)
