"""PPG windows per device -> jobs on a Redis stream -> the AI service -> ``analyses``.

Windows are aligned to the epoch (``ANALYSIS_WINDOW`` seconds). When the persist worker
stores a device's first batch of a new window, the window before it is due: one Lua call
sets a marker per device window (``SET NX``) and adds a job only when the marker is new, so
however many workers see the boundary, each window becomes one job. A job waits
``ANALYSIS_GRACE`` seconds (batches of the window that other workers hold get committed
meanwhile), then reads the window's samples from ``readings``.

The runner (consumer group ``analysis``) keeps at most ``ANALYSIS_CONCURRENCY`` jobs in
progress. Each call to ``POST {AI_SERVICE_URL}/analyze`` is bounded by ``ANALYSIS_TIMEOUT``;
a failure (connection error, timeout, 5xx, 429) is retried ``ANALYSIS_RETRIES`` times with
exponential backoff and jitter, then the job is stored as failed. A circuit breaker opens
after ``ANALYSIS_BREAKER_FAILURES`` failed calls in a row: no calls for
``ANALYSIS_BREAKER_RESET`` seconds, and no new jobs are taken (they wait in the stream and
``queue_depth`` shows them); then one trial call (half-open) closes it again or re-opens it.
A job that waited longer than ``ANALYSIS_MAX_AGE`` is stored as failed ("expired").
"""

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
import psycopg
from aiohttp import ClientError, ClientSession, ClientTimeout
from loguru import logger
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisClusterException, RedisError

from shared.keys import Keys
from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.reporting import Telemetry
from shared.telemetry import analysis_record

from .groups import Delivery, GroupReader
from .persist import Row

__all__ = (
    "ANALYSIS_GROUP",
    "AnalysisRunner",
    "CircuitBreaker",
    "Job",
    "WindowScheduler",
)

ANALYSIS_GROUP = "analysis"
# A window with less than this share of its samples is not worth analysing.
_MIN_COVERAGE = 0.5

_SCHEDULE_LUA = """
local ttl = ARGV[1]
local due = ARGV[2]
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    local j = 3 + (i - 2) * 3
    redis.call('XADD', KEYS[1], '*', 'device_id', ARGV[j], 'start_ms', ARGV[j + 1],
      'end_ms', ARGV[j + 2], 'due_ms', due)
    added = added + 1
  end
end
return added
"""


class WindowScheduler:
    """Turns the batches a worker stored into one analysis job per device window."""

    def __init__(self, redis: RedisClient, keys: Keys, *, window: float, grace: float) -> None:
        self._redis = redis
        self._keys = keys
        self._window_ms = max(1, int(window * 1000))
        self._grace_ms = int(grace * 1000)
        self._marker_ttl = max(3600, int(window * 10))
        self._script = redis.register_script(_SCHEDULE_LUA)
        self._current: dict[str, int] = {}
        self._due: set[tuple[str, int]] = set()
        self.scheduled = 0

    def note(self, rows: list[Row]) -> None:
        for row in rows:
            window = row.ts_ms // self._window_ms
            current = self._current.get(row.device_id)
            if current is not None and window <= current:
                continue
            self._current[row.device_id] = window
            if current is not None:
                # The window this worker saw the device in, and (when another worker may
                # have seen the device there) the one just before the new window.
                self._due.add((row.device_id, current))
                if window - 1 > current:
                    self._due.add((row.device_id, window - 1))

    async def flush(self) -> int:
        if not self._due:
            return 0
        due = sorted(self._due)
        keys = [self._keys.analysis_jobs]
        args: list[str | int] = [self._marker_ttl, time.time_ns() // 1_000_000 + self._grace_ms]
        for device_id, window in due:
            start = window * self._window_ms
            keys.append(self._keys.analysis_window(device_id, start))
            args += [device_id, start, start + self._window_ms]
        added = int(await self._script(keys=keys, args=args))
        self._due.difference_update(due)
        self.scheduled += added
        return added

    async def on_persisted(self, rows: list[Row]) -> None:
        self.note(rows)
        try:
            await self.flush()
        except REDIS_ERRORS as e:
            logger.warning("worker: analysis jobs not scheduled yet ({}); kept for later", e)


class CircuitBreaker:
    """Closed -> (``failures`` failures in a row) open -> (``reset`` s) half-open -> ..."""

    def __init__(
        self, *, failures: int, reset: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._reset = reset
        self._clock = clock
        self.state: Literal["closed", "open", "half-open"] = "closed"
        self.failures = 0
        self.opened = 0  # times it opened
        self._open_until = 0.0
        self._trial = False
        self._changed = asyncio.Event()

    def _set(self, state: Literal["closed", "open", "half-open"]) -> None:
        if state != self.state:
            logger.bind(circuit=state).warning(
                "worker: AI service circuit {} -> {}", self.state, state
            )
            self.state = state
        self._changed.set()
        self._changed = asyncio.Event()

    async def acquire(self) -> None:
        """Wait until a call may be made: closed, or this is the half-open trial call."""
        while True:
            if self.state == "closed":
                return
            if self.state == "open":
                wait = self._open_until - self._clock()
                if wait <= 0:
                    self._set("half-open")
                    self._trial = True
                    return
                changed = self._changed
                try:
                    async with asyncio.timeout(wait):
                        await changed.wait()
                except TimeoutError:
                    pass
                continue
            if not self._trial:
                self._trial = True
                return
            await self._changed.wait()

    def succeeded(self) -> None:
        self.failures = 0
        self._trial = False
        if self.state != "closed":
            self._set("closed")

    def failed(self) -> None:
        self.failures += 1
        self._trial = False
        if self.state == "half-open" or self.failures >= self._threshold:
            self._open_until = self._clock() + self._reset
            if self.state != "open":
                self.opened += 1
            self._set("open")

    def release(self) -> None:
        """A trial call that was never made (the job ended first)."""
        if self.state == "half-open" and self._trial:
            self._trial = False
            self._changed.set()
            self._changed = asyncio.Event()

    @property
    def waiting(self) -> bool:
        return self.state == "open" and self._clock() < self._open_until

    async def settled(self) -> None:
        """Until the circuit is not open, or its reset time has come."""
        while self.waiting:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._open_until - self._clock()):
                    await changed.wait()


class Job(msgspec.Struct, frozen=True, gc=False):
    entry_id: str
    device_id: str
    start_ms: int
    end_ms: int
    due_ms: int
    deliveries: int


class _Analysis(msgspec.Struct, gc=False):
    heart_rate_bpm: Annotated[float, msgspec.Meta(ge=0, le=400)]
    hrv_rmssd_ms: float | None = None
    hrv_sdnn_ms: float | None = None
    beats: int | None = None
    quality: float | None = None


_analysis_decoder = msgspec.json.Decoder(_Analysis)


class _RetryableError(Exception):
    pass


class _RefusedError(Exception):
    pass


@dataclass(slots=True)
class _Outcome:
    status: Literal["completed", "failed", "skipped", "rejected"]
    samples: int = 0
    attempts: int = 0
    result: _Analysis | None = None
    error: str | None = None

    @property
    def code(self) -> int:
        return {"completed": 200, "skipped": 204, "rejected": 422, "failed": 500}[self.status]


_LOAD_WINDOW = """
    SELECT rate_hz, ppg FROM readings
    WHERE device_id = %s AND ts >= %s AND ts < %s
    ORDER BY ts
"""
_STORE = """
    INSERT INTO analyses (device_id, window_start, window_end, status, samples,
        heart_rate_bpm, hrv_rmssd_ms, hrv_sdnn_ms, beats, quality, error, attempts, duration_ms)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (device_id, window_start) DO UPDATE SET
        status = excluded.status, samples = excluded.samples,
        heart_rate_bpm = excluded.heart_rate_bpm, hrv_rmssd_ms = excluded.hrv_rmssd_ms,
        hrv_sdnn_ms = excluded.hrv_sdnn_ms, beats = excluded.beats,
        quality = excluded.quality, error = excluded.error, attempts = excluded.attempts,
        duration_ms = excluded.duration_ms, created_at = now()
"""


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


class AnalysisRunner:
    def __init__(
        self,
        # Typed as GroupReader (worker/groups.py) takes it; a RedisCluster works the same.
        redis: RedisClient,
        pool: AsyncConnectionPool,
        session: ClientSession,
        keys: Keys,
        *,
        url: str,
        consumer: str,
        concurrency: int,
        timeout: float,
        retries: int,
        backoff: float,
        backoff_max: float,
        breaker: CircuitBreaker,
        max_age: float,
        claim_idle: float,
        dead_letter_after: int,
        telemetry: Telemetry,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._session = session
        self._stream = keys.analysis_jobs
        # One job at a time: each takes a slot of its own.
        self._reader = GroupReader(
            redis,
            self._stream,
            ANALYSIS_GROUP,
            consumer=consumer,
            count=1,
            claim_idle=claim_idle,
            # A job whose count is lost gets its last try rather than failing unrun.
            last_try=dead_letter_after,
            label="analysis job",
        )
        self._url = url.rstrip("/") + "/analyze"
        self._consumer = consumer
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = ClientTimeout(total=timeout)
        self._retries = retries
        self._backoff = backoff
        self._backoff_max = backoff_max
        self.breaker = breaker
        self._max_age_ms = int(max_age * 1000)
        self._dead_after = dead_letter_after
        self._telemetry = telemetry
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self.outcomes = {"completed": 0, "failed": 0, "skipped": 0, "rejected": 0}
        self.calls = 0
        self.call_failures = 0

    @property
    def group_ready(self) -> bool:
        return self._reader.group_ready

    async def run(self) -> None:
        delay = 0.05
        while not self.group_ready:
            try:
                await self._reader.ensure_group()
            except REDIS_ERRORS as e:
                logger.debug("analysis group not created yet: {}", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        try:
            while True:
                await self._slots.acquire()
                try:
                    # No new jobs while the circuit is open: they wait in the stream.
                    await self.breaker.settled()
                    jobs = await self._next_jobs()
                except BaseException:
                    self._slots.release()
                    raise
                if not jobs:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._run(jobs[0]), name="analysis-job")
                self._tasks.add(task)
                task.add_done_callback(self._done)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("worker: an analysis job failed")

    async def _next_jobs(self) -> list[Job]:
        try:
            deliveries = await self._reader.read()
        except REDIS_ERRORS as e:
            logger.debug("analysis jobs not read: {}", e)
            await asyncio.sleep(0.5)
            return []
        return [self._job(d) for d in deliveries]

    @staticmethod
    def _job(delivery: Delivery) -> Job:
        fields = delivery.fields
        return Job(
            entry_id=delivery.entry_id.decode(),
            device_id=fields.get(b"device_id", b"").decode(),
            start_ms=int(fields.get(b"start_ms", b"0")),
            end_ms=int(fields.get(b"end_ms", b"0")),
            due_ms=int(fields.get(b"due_ms", b"0")),
            deliveries=delivery.deliveries,
        )

    async def _run(self, job: Job) -> None:
        self.active += 1
        started = time.perf_counter()
        try:
            outcome = await self._analyse(job)
            duration_ms = (time.perf_counter() - started) * 1000
            await self._store(job, outcome, duration_ms)
            await self._redis.xack(self._stream, ANALYSIS_GROUP, job.entry_id)
        except (psycopg.Error, RedisError, RedisClusterException, OSError) as e:
            # Left pending: claimed again once idle (by this worker or another).
            logger.warning("worker: analysis job {} not finished: {}", job.entry_id, e)
            return
        finally:
            self.active -= 1
        self.outcomes[outcome.status] += 1
        self._telemetry.record(
            analysis_record(
                outcome.code, int(duration_ms * 1000), outcome.attempts, outcome.samples
            )
        )
        bound = logger.bind(deviceId=job.device_id, windowStart=job.start_ms)
        if outcome.status == "failed":
            bound.warning(
                "worker: analysis of {} window {} failed after {} attempts: {}",
                job.device_id,
                job.start_ms,
                outcome.attempts,
                outcome.error,
            )
        elif outcome.status == "rejected":
            bound.info("worker: the AI service refused window {}: {}", job.start_ms, outcome.error)

    def _expired(self, job: Job) -> bool:
        """Waited in the queue too long (from when it became due, by the worker's clock)."""
        return time.time_ns() // 1_000_000 - job.due_ms > self._max_age_ms

    async def _analyse(self, job: Job) -> _Outcome:
        if job.deliveries > self._dead_after:
            return _Outcome("failed", error=f"delivered {job.deliveries} times without finishing")
        wait = job.due_ms / 1000 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._expired(job):
            return _Outcome("failed", error="expired before it could run")
        rate_hz, samples = await self._load(job)
        expected = rate_hz * (job.end_ms - job.start_ms) / 1000
        if not samples or len(samples) < expected * _MIN_COVERAGE:
            return _Outcome(
                "skipped", len(samples), error=f"{len(samples)} of ~{expected:.0f} samples"
            )
        body = msgspec.json.encode(
            {
                "device_id": job.device_id,
                "rate_hz": rate_hz,
                "start_ms": job.start_ms,
                "ppg": samples,
            }
        )
        attempts = 0
        last_error = ""
        while True:
            await self.breaker.acquire()
            if self._expired(job):
                self.breaker.release()
                return _Outcome("failed", len(samples), attempts, error="expired: " + last_error)
            attempts += 1
            try:
                result = await self._call(body)
            except _RefusedError as e:
                self.breaker.succeeded()  # the service answered: it is up
                return _Outcome("rejected", len(samples), attempts, error=str(e))
            except _RetryableError as e:
                self.breaker.failed()
                self.call_failures += 1
                last_error = str(e)
                if attempts > self._retries:
                    return _Outcome("failed", len(samples), attempts, error=last_error)
                cap = min(self._backoff_max, self._backoff * 2 ** (attempts - 1))
                await asyncio.sleep(cap / 2 + random.uniform(0, cap / 2))
                continue
            self.breaker.succeeded()
            return _Outcome("completed", len(samples), attempts, result=result)

    async def _call(self, body: bytes) -> _Analysis:
        self.calls += 1
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=self._timeout,
            ) as response:
                payload = await response.read()
                status = response.status
        except TimeoutError as e:
            raise _RetryableError("timed out") from e
        except ClientError as e:
            raise _RetryableError(f"{type(e).__name__}: {e}") from e
        if status >= 500 or status in (408, 429):
            raise _RetryableError(f"HTTP {status}: {payload[:200]!r}")
        if status != 200:
            raise _RefusedError(f"HTTP {status}: {payload[:300].decode(errors='replace')}")
        try:
            return _analysis_decoder.decode(payload)
        except msgspec.DecodeError as e:
            raise _RetryableError(f"unreadable answer: {e}") from e

    async def _load(self, job: Job) -> tuple[float, list[float]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                _LOAD_WINDOW, (job.device_id, _utc(job.start_ms), _utc(job.end_ms))
            )
            rows = await cur.fetchall()
        samples: list[float] = []
        for _, ppg in rows:
            samples.extend(ppg)
        return (float(rows[0][0]) if rows else 0.0), samples

    async def _store(self, job: Job, outcome: _Outcome, duration_ms: float) -> None:
        result = outcome.result
        async with self._pool.connection() as conn:
            await conn.execute(
                _STORE,
                (
                    job.device_id,
                    _utc(job.start_ms),
                    _utc(job.end_ms),
                    outcome.status,
                    outcome.samples,
                    result.heart_rate_bpm if result else None,
                    result.hrv_rmssd_ms if result else None,
                    result.hrv_sdnn_ms if result else None,
                    result.beats if result else None,
                    result.quality if result else None,
                    outcome.error,
                    outcome.attempts,
                    round(duration_ms, 3),
                ),
            )
