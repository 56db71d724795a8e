"""Reading a pod's telemetry stream, and the checkpoint that makes restarts exact.

Each read is one ``MULTI``: ``XINFO STREAM`` and a non-blocking ``XREAD`` from the saved
position, so the stream's counters describe exactly the entries the read returned. From
them follow the backlog, the lag behind the head and, when ``MAXLEN`` trimmed entries away
before they were read, the size of that gap (``entries-added`` minus ``length`` is how many
entries the stream has lost from its head; the position remembers how many it had read).
When nothing is new, a blocking ``XREAD`` waits for the next entry.

The checkpoint is one key holding the position and the aggregate state together (one
``SET``, atomic), written every ``SIDECAR_CHECKPOINT_INTERVAL``, before every scrape is
answered and on shutdown: a restart resumes from totals that match where it reads from,
so nothing is lost or counted twice, and a counter never goes below a value once scraped.
"""

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from loguru import logger
from redis.exceptions import ResponseError

from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.telemetry import BATCH_FIELD, decode_batch

from .aggregate import Aggregator

__all__ = ("TelemetryConsumer",)

T = TypeVar("T")

_RETRY_MIN = 0.1
_RETRY_MAX = 2.0


def _id_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TelemetryConsumer:
    def __init__(
        self,
        redis: RedisClient,
        *,
        stream: str,
        state_key: str,
        max_series: int,
        read_count: int,
        block_ms: int,
        checkpoint_interval: float,
        state_ttl: int,
        save_timeout: float = 1.0,
    ) -> None:
        self._redis = redis
        self.stream = stream
        self._state_key = state_key
        self._max_series = max_series
        self._read_count = read_count
        self._block_ms = block_ms
        self._checkpoint_interval = checkpoint_interval
        self._state_ttl = state_ttl
        self._save_timeout = save_timeout
        self._save_lock = asyncio.Lock()
        self._saved_generation = -1
        self._save_failing = False
        # None until the saved state is loaded: serving totals before that would show
        # counters going back to zero and then jumping up again.
        self.aggregator: Aggregator | None = None
        self.backlog = 0
        self.lag_s = 0.0
        self.last_read_at = 0.0  # wall clock of the last successful read
        self.saved_at = 0.0
        self.error: str | None = None
        self.read_errors = 0
        self.checkpoint_failures = 0

    # -- state ---------------------------------------------------------------------------

    async def load(self) -> Aggregator:
        data = await self._redis.get(self._state_key)
        if isinstance(data, str):  # only with decode_responses, which this client has not
            data = data.encode()
        if data is None:
            aggregator = Aggregator(max_series=self._max_series)
            logger.info("no saved telemetry state: reading {} from its start", self.stream)
        else:
            try:
                aggregator = Aggregator.from_bytes(data, max_series=self._max_series)
            except ValueError as e:
                logger.warning("{}; starting from zero", e)
                aggregator = Aggregator(max_series=self._max_series)
            else:
                logger.info(
                    "resuming {} after entry {} with {} records counted",
                    self.stream,
                    aggregator.last_id,
                    aggregator.records,
                )
        self._saved_generation = aggregator.generation
        self.aggregator = aggregator
        return aggregator

    async def save(self) -> bool:
        """Write the checkpoint if anything changed since the last one; False if it failed."""
        async with self._save_lock:
            return await self._save_locked()

    async def save_after(self, render: Callable[[Aggregator], T]) -> T:
        """``render`` the current state, then make sure that state is saved, then return.

        What a scrape has seen is then never ahead of the checkpoint: a sidecar killed
        right after cannot come back with smaller totals (Prometheus would read a counter
        reset). If the save fails the answer is given anyway: metrics over strictness.
        """
        async with self._save_lock:
            aggregator = self.aggregator
            if aggregator is None:
                raise RuntimeError("the telemetry state is not loaded yet")
            result = render(aggregator)
            await self._save_locked()
            return result

    async def _save_locked(self) -> bool:
        aggregator = self.aggregator
        if aggregator is None:
            return False
        generation = aggregator.generation
        if generation == self._saved_generation:
            return True
        data = aggregator.to_bytes()  # before any await: the state as of this moment
        try:
            # Bounded: a scrape waits for this. A SET that lands after the timeout is still
            # a consistent state; this one is then simply saved again next time.
            async with asyncio.timeout(self._save_timeout):
                await self._redis.set(self._state_key, data, ex=self._state_ttl)
        except REDIS_ERRORS as e:
            self.checkpoint_failures += 1
            if not self._save_failing:
                logger.warning("telemetry checkpoint not saved: {}: {}", type(e).__name__, e)
            self._save_failing = True
            return False
        if self._save_failing:
            logger.info("telemetry checkpoint saved again")
        self._save_failing = False
        self._saved_generation = generation
        self.saved_at = time.time()
        return True

    # -- reading -------------------------------------------------------------------------

    async def read_once(self) -> int:
        """Consume what is new (up to the read count); how many entries that was."""
        aggregator = self.aggregator
        assert aggregator is not None, "load() first"
        pipe = self._redis.pipeline(transaction=True)
        pipe.xinfo_stream(self.stream)
        pipe.xread({self.stream: aggregator.last_id}, count=self._read_count)
        info, reply = await pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(info, ResponseError) and "no such key" in str(info).lower():
            added = length = 0
            head = "0-0"
        elif isinstance(info, Exception):
            raise info
        else:
            added = int(info["entries-added"])
            length = int(info["length"])
            head = _text(info["last-generated-id"])
        self.last_read_at = time.time()
        if added < aggregator.entries_read or _id_key(head) < _id_key(aggregator.last_id):
            # Not the stream the position belongs to: deleted, or lost with Redis's data.
            logger.warning(
                "{} restarted (had read {} entries, it has had {}): reading it from its start",
                self.stream,
                aggregator.entries_read,
                added,
            )
            aggregator.stream_resets += 1
            aggregator.last_id = "0-0"
            aggregator.entries_read = 0
            aggregator.generation += 1
            return 1  # read again at once, from the new position
        trimmed = added - length
        if trimmed > aggregator.entries_read:
            missed = trimmed - aggregator.entries_read
            logger.warning("{} entries of {} were trimmed before being read", missed, self.stream)
            aggregator.gap_entries += missed
            aggregator.entries_read = trimmed
            aggregator.generation += 1
        entries = reply[0][1] if reply else []
        for _, fields in entries:
            try:
                batch = decode_batch(fields[BATCH_FIELD])
            except (KeyError, TypeError, msgspec.DecodeError):
                aggregator.note_decode_error()
            else:
                aggregator.add_batch(batch)
        if entries:
            aggregator.last_id = _text(entries[-1][0])
            aggregator.entries_read += len(entries)
        self.backlog = added - aggregator.entries_read
        self.lag_s = (
            max(0, _id_ms(head) - _id_ms(aggregator.last_id)) / 1000 if self.backlog else 0.0
        )
        return len(entries)

    async def _wait_for_entries(self) -> None:
        aggregator = self.aggregator
        assert aggregator is not None
        # Only a wake-up: what arrived is read (and counted) by the next read_once.
        await self._redis.xread({self.stream: aggregator.last_id}, count=1, block=self._block_ms)

    def _failed(self, what: str, e: Exception) -> None:
        message = f"{type(e).__name__}: {e}".rstrip(": ")
        if self.error is None:
            logger.warning("telemetry {} failed, retrying: {}", what, message)
        self.error = message
        self.read_errors += 1

    async def run(self) -> None:
        delay = _RETRY_MIN
        while self.aggregator is None:
            try:
                await self.load()
            except REDIS_ERRORS as e:
                self._failed("state load", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
        loop = asyncio.get_running_loop()
        next_save = loop.time() + self._checkpoint_interval
        while True:
            try:
                got = await self.read_once()
                if loop.time() >= next_save:
                    await self.save()
                    next_save = loop.time() + self._checkpoint_interval
                if not got:
                    await self._wait_for_entries()
            except REDIS_ERRORS as e:
                self._failed("read", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
            else:
                if self.error is not None:
                    logger.info("telemetry reads recovered")
                    self.error = None
                delay = _RETRY_MIN
