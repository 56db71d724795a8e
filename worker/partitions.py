"""The workers divide the readings partitions among themselves.

Every worker says it is alive in ``keys.persist_workers`` (its consumer name, scored by
when that expires) every ``interval``; the live ones, sorted by name, take the partitions
in turn: partition ``i`` of the sorted list of partitions to consume goes to worker
``i mod W``. Each worker computes the same split from the same two sets, so nothing is
negotiated; while two views differ (a worker just came or went) a partition may be read by
two workers or by none for one interval, which costs nothing: each partition's consumer group
hands an entry to one consumer, the rows are idempotent on ``(device_id, ts, seq)``, and an
entry a worker left pending is taken over by the partition's next owner (its consumer is
dead once its heartbeat is gone, ``worker/consumers.py``; else after ``WORKER_CLAIM_IDLE``).

The partitions to consume are those of every layout (``shared/partitions.py``) a service
said it writes within ``INGEST_LAYOUT_GRACE`` (``keys.ingest_layouts``), of the worker's
own ``INGEST_PARTITIONS``, and of any layout whose partitions still hold entries not
persisted. A layout no service has written for the grace and whose partitions are drained
is forgotten. So changing ``INGEST_PARTITIONS`` loses nothing: the old layout is drained
while the new one fills (docs/scaling.md). A forgotten layout is noted in
``keys.retired_layouts``; a worker deletes its emptied streams a while later, each only if
everything in it is persisted (``worker/cleaner.py``). A late write to such a stream (a
service still on the old layout) keeps it, or recreates it if it is already gone; the
service's next announcement makes the workers consume the layout again, from the stream's
first entry, as its group is created anew.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

from loguru import logger
from redis.exceptions import RedisError

from shared.keys import Keys, PartitionKeys
from shared.partitions import MAX_PARTITIONS
from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.tasks import cancel_and_wait

from .persist import ReadingsPersister

__all__ = ("PartitionedPersistence", "assign")

# A persister's totals, summed over the partitions (``ReadingsPersister``'s attributes).
_COUNTERS = ("rows", "samples", "duplicates", "groups", "dead_letters", "rejected", "claimed")

# Forget a layout only if no service wrote it for the grace and its score is still the one
# read (a service saying it writes it again meanwhile keeps it); one that is forgotten is
# noted as retired (both keys under {ingest}), for its emptied streams to go later.
_FORGET_LAYOUT = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


def assign(
    partitions: Iterable[PartitionKeys], workers: Iterable[str], me: str
) -> list[PartitionKeys]:
    """The partitions ``me`` consumes when ``workers`` (``me`` among them) share them."""
    members = sorted({*workers, me})
    ordered = sorted(partitions, key=lambda p: (p.partition.count, p.partition.index))
    mine = members.index(me)
    return [p for i, p in enumerate(ordered) if i % len(members) == mine]


class PartitionedPersistence:
    """Runs a ``ReadingsPersister`` for each partition this worker owns, and follows the
    ownership as workers and layouts come and go."""

    # Seconds between two looks at the members and layouts, and how long a worker counts as
    # a member after its last: a dead worker's partitions wait at most that long for
    # another (its pending entries are then taken over as a dead consumer's).
    INTERVAL = 1.0
    MEMBER_TTL = 5.0

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        consumer: str,
        partitions: int,
        layout_grace: float,
        interval: float,
        member_ttl: float,
        make: Callable[[PartitionKeys], ReadingsPersister],
        stop_timeout: float,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._consumer = consumer
        self._own = partitions
        self._grace_ms = int(layout_grace * 1000)
        self._interval = interval
        self._ttl_ms = int(member_ttl * 1000)
        self._make = make
        self._stop_timeout = stop_timeout
        self._stopping = asyncio.Event()
        self._forget = redis.register_script(_FORGET_LAYOUT)
        # The layouts to consume (partition counts) and when a service last wrote each.
        self.layouts: dict[int, int] = {partitions: 0}
        self.workers: list[str] = []
        self.running: dict[PartitionKeys, tuple[ReadingsPersister, asyncio.Task[None]]] = {}
        # Set by the janitor: each partition's persist lag + pending, and lag alone.
        self.measured: dict[str, tuple[int, int]] = {}
        self.assigned = False
        # Totals of persisters no longer running (their partition went to another worker).
        self._retired = dict.fromkeys(_COUNTERS, 0)
        self.handovers = 0
        self._retiring: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ what to consume

    def streams(self) -> list[PartitionKeys]:
        """Every partition of the layouts consumed (what the janitor measures)."""
        return [p for count in sorted(self.layouts) for p in self._keys.partitions(count)]

    async def _look(self) -> list[PartitionKeys]:
        now = time.time_ns() // 1_000_000
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._keys.persist_workers, {self._consumer: now + self._ttl_ms})
            pipe.zremrangebyscore(self._keys.persist_workers, "-inf", now)
            pipe.zrange(self._keys.persist_workers, 0, -1)
            pipe.zrange(self._keys.ingest_layouts, 0, -1, withscores=True)
            _, _, members, announced = await pipe.execute()
        self.workers = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        layouts = {self._own: now}
        for member, score in announced:
            raw = member.decode() if isinstance(member, bytes) else str(member)
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_PARTITIONS:
                continue
            count, at = int(raw), int(score)
            if count == self._own:
                continue
            if now - at > self._grace_ms and self._drained(count):
                if await self._forget(
                    keys=[self._keys.ingest_layouts, self._keys.retired_layouts],
                    args=[raw, str(at), str(now)],
                ):
                    logger.info("worker: layout of {} partitions drained and forgotten", count)
                continue
            layouts[count] = at
        self.layouts = layouts
        return assign(self.streams(), self.workers, self._consumer)

    def _drained(self, count: int) -> bool:
        """Every partition of the layout measured with nothing left to persist."""
        for p in self._keys.partitions(count):
            lag_and_pending = self.measured.get(p.partition.name)
            if lag_and_pending is None or sum(lag_and_pending) > 0:
                return False
        return True

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    async with asyncio.timeout(max(self._interval, 1.0)):
                        owned = await self._look()
                except REDIS_ERRORS as e:
                    # Keep what runs: each persister retries Redis itself.
                    logger.debug("worker: partition ownership not refreshed: {}", e)
                else:
                    self._follow(owned)
                    self.assigned = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._stopping.wait()
        finally:
            await self._stop_all()
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    # Gone at once, so the others take its partitions without waiting.
                    await self._redis.zrem(self._keys.persist_workers, self._consumer)

    def _follow(self, owned: list[PartitionKeys]) -> None:
        wanted = set(owned)
        for partition in [p for p in self.running if p not in wanted]:
            persister, task = self.running.pop(partition)
            persister.stop()
            self.handovers += 1
            retiring = asyncio.create_task(self._retire(partition, persister, task))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        for partition in owned:
            if partition not in self.running:
                persister = self._make(partition)
                task = asyncio.create_task(persister.run(), name=f"persist {partition.readings}")
                self.running[partition] = (persister, task)
                logger.info("worker: consuming readings partition {}", partition.partition.name)

    async def _retire(
        self, partition: PartitionKeys, persister: ReadingsPersister, task: "asyncio.Task[None]"
    ) -> None:
        """Let the persister finish its round (its entries committed and acknowledged)."""
        try:
            async with asyncio.timeout(self._stop_timeout):
                await asyncio.shield(task)
        except TimeoutError:
            logger.warning(
                "worker: partition {} handed over mid-round; its entries stay pending",
                partition.partition.name,
            )
        await cancel_and_wait([task])
        for name in self._retired:
            self._retired[name] += getattr(persister, name)
        logger.info("worker: readings partition {} handed over", partition.partition.name)

    def stop(self) -> None:
        """Every persister finishes the round in hand, then ``run`` returns."""
        self._stopping.set()
        for persister, _ in self.running.values():
            persister.stop()

    async def _stop_all(self) -> None:
        tasks = [task for _, task in self.running.values()] + list(self._retiring)
        for persister, _ in self.running.values():
            persister.stop()
        try:
            async with asyncio.timeout(self._stop_timeout):
                await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        except TimeoutError:
            logger.warning(
                "shutdown: the persist rounds did not finish; their entries stay pending"
            )
        await cancel_and_wait(tasks)

    # ------------------------------------------------------------------ figures

    def _total(self, name: str) -> int:
        running: int = sum(getattr(p, name) for p, _ in self.running.values())
        return self._retired[name] + running

    @property
    def rows(self) -> int:
        return self._total("rows")

    @property
    def samples(self) -> int:
        return self._total("samples")

    @property
    def duplicates(self) -> int:
        return self._total("duplicates")

    @property
    def claimed(self) -> int:
        return self._total("claimed")

    @property
    def groups(self) -> int:
        return self._total("groups")

    @property
    def dead_letters(self) -> int:
        return self._total("dead_letters")

    @property
    def rejected(self) -> int:
        return self._total("rejected")

    @property
    def db_ok(self) -> bool:
        return all(p.db_ok for p, _ in self.running.values())

    @property
    def group_ready(self) -> bool:
        """Ownership known, and the group of every partition owned created."""
        return self.assigned and all(p.group_ready for p, _ in self.running.values())

    @property
    def owned(self) -> list[str]:
        return sorted(p.partition.name for p in self.running)

    @property
    def backlog(self) -> int:
        """Entries not yet persisted, over every partition consumed (lag + pending)."""
        return sum(lag + pending for lag, pending in self.measured.values())

    @property
    def undelivered(self) -> int:
        """Entries not yet delivered to any consumer (-1: not measured yet)."""
        if not self.measured:
            return -1
        return sum(lag for lag, _ in self.measured.values())

    @property
    def partition_backlog(self) -> dict[str, int]:
        return {name: lag + pending for name, (lag, pending) in self.measured.items()}
