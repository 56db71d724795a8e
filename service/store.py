"""Durable group commit of device batches to the readings stream.

One flusher task owns the Redis connection. A request appends its batch to the pending list
and awaits a future; if fewer than ``max_in_flight`` writes are in flight the batch goes at
once, otherwise it joins the next write, which leaves as soon as one in flight returns. So
concurrent requests share one round trip (one EVALSHA) without any idle wait, the loop is
not left idle while a write travels, and a request is answered only after Redis has
accepted its batch.
"""

import asyncio
import hashlib
import string
import time
from dataclasses import dataclass
from typing import Final, Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared.keys import Keys
from shared.readings import BATCH_FIELD, RECEIVED_FIELD, TRACE_FIELD
from shared.tasks import cancel_and_wait

from .fastpath.resp import RespConnection, encode_bulk_strings, encode_command
from .ratelimit import GCRA_LUA, Policy

__all__ = (
    "DUPLICATE",
    "NOT_ATTEMPTED",
    "NO_POLICY",
    "STORED",
    "BacklogMonitor",
    "ReadingsWriter",
    "StoreUnavailableError",
    "WriteResult",
)

# Per batch, in one all-or-nothing step: the device's rate limit (GCRA, see ratelimit.py),
# then idempotency, then the write. Idempotency: a per-device sorted set of recent seqs (at
# most `window` of them, so it stays small and listpack-encoded). A seq older than what the
# set holds is accepted again; the persistence worker is idempotent on (device_id, seq) as
# well. Trimming and refreshing the TTL cost two more commands, so they run only when the
# set is new or over the window, and then trim it to `keep` (7/8 of the window): one batch
# in `window - keep` pays for them. The shebang makes Redis check memory once, before the
# script runs, so no command in it fails for lack of memory: a seq is marked seen only in
# the same step that stores its batch.
#
# KEYS: the stream, then per batch its seen-set and one GCRA cell per policy window.
# ARGV: window, keep, ttl, received ms, window count, shadow, (limit, period ms) per window,
# then per batch its seq, payload and traceparent ('' when not sampled). The entry is the
# one shared.readings.encode_entry writes (the field names are put in from there): the body,
# the time it was received in ms and, for a sampled request, the traceparent.
# Reply: five integers per batch (see WriteResult).
_WRITE_BATCH_LUA = (
    "#!lua\n"
    + GCRA_LUA
    + string.Template("""
local stream = KEYS[1]
local window = tonumber(ARGV[1])
local keep_from = -1 - tonumber(ARGV[2])
local ttl = ARGV[3]
local received = ARGV[4]
local nw = tonumber(ARGV[5])
local shadow = tonumber(ARGV[6])
local items = 7 + 2 * nw
local stride = 1 + nw
local now = 0
if nw > 0 then now = redis_now_ms() end
local out = {}
for i = 0, (#KEYS - 1) / stride - 1 do
  local seen = KEYS[2 + i * stride]
  local verdict, w, remaining, reset = 0, 0, 0, 0
  if nw > 0 then
    verdict, w, remaining, reset = gcra(3 + i * stride, nw, shadow, 7, now)
  end
  local stored = -1
  if verdict ~= 2 then
    local seq = ARGV[items + 3 * i]
    if redis.call('ZADD', seen, 'NX', seq, seq) == 1 then
      local trace = ARGV[items + 3 * i + 2]
      if trace == '' then
        redis.call('XADD', stream, '*', '$batch', ARGV[items + 3 * i + 1], '$received', received)
      else
        redis.call('XADD', stream, '*', '$batch', ARGV[items + 3 * i + 1], '$received', received,
          '$trace', trace)
      end
      local held = redis.call('ZCARD', seen)
      if held == 1 or held > window then
        redis.call('ZREMRANGEBYRANK', seen, 0, keep_from)
        redis.call('EXPIRE', seen, ttl)
      end
      stored = 1
    else
      stored = 0
    end
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = stored, verdict, w, remaining, reset
end
return out
""").substitute(
        batch=BATCH_FIELD.decode(), received=RECEIVED_FIELD.decode(), trace=TRACE_FIELD.decode()
    )
)

# What a batch's five integers in the script's reply say (``WriteResult.stored``).
STORED: Final = 1
DUPLICATE: Final = 0
NOT_ATTEMPTED: Final = -1  # the rate limit refused the batch: no idempotency check, no write
# ``WriteResult.verdict`` without an ingest policy; with one, the GCRA's code
# (``ratelimit.ALLOWED``, ``REFUSED``, ``SHADOWED``).
NO_POLICY: Final = 0


class WriteResult(msgspec.Struct, frozen=True, gc=False):
    """What Redis answered for one batch: the script's five integers, in its order.

    A struct rather than a NamedTuple: built from the flat reply as cheaply as a plain tuple
    (a tuple subclass is built twice over), and its fields read faster than an index.
    """

    # STORED, DUPLICATE or NOT_ATTEMPTED.
    stored: int
    # NO_POLICY, or what the ingest policy decided (ratelimit.ALLOWED, REFUSED, SHADOWED).
    verdict: int
    # The deciding window of the policy (1-based; 0 with NO_POLICY), the requests left in
    # it, and the ms until it is full again (refused: until one more request would pass).
    window: int
    remaining: int
    reset_ms: int


class StoreUnavailableError(Exception):
    """Redis did not accept the batch (down, slow, full, or our queue is full)."""


class Waiter(Protocol):
    """What is told a batch's outcome: an ``asyncio.Future``, or an object that acts on it
    at once (a WebSocket message answers from here, no task resumed)."""

    def done(self) -> bool: ...

    def set_result(self, result: WriteResult, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(slots=True)
class _Pending:
    device_id: str
    seq: int
    payload: bytes
    future: Waiter
    trace: bytes


# Redis names scripts by their SHA-1; nothing here relies on it as a secure hash.
_WRITE_BATCH_SHA = hashlib.sha1(_WRITE_BATCH_LUA.encode()).hexdigest().encode()  # noqa: S324
_LOAD_SCRIPT = encode_command([b"SCRIPT", b"LOAD", _WRITE_BATCH_LUA.encode()])


class ReadingsWriter:
    def __init__(
        self,
        redis: RespConnection,
        keys: Keys,
        *,
        max_batch: int,
        max_pending: int,
        max_in_flight: int,
        timeout: float,
        idempotency_window: int,
        idempotency_ttl: int,
        policy: Policy | None = None,
    ) -> None:
        self._redis = redis
        # Looked up once: on Python 3.11 every get_running_loop() is a getpid() syscall.
        self._loop = asyncio.get_running_loop()
        self._max_in_flight = max_in_flight
        self._keys = keys
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._timeout = timeout
        self._stream_key = keys.readings.encode()
        self._seen_prefix = keys.seen_prefix.encode()
        keep = idempotency_window - max(1, idempotency_window // 8)
        self._fixed_args = (
            b"%d" % idempotency_window,
            b"%d" % max(keep, 1),
            b"%d" % idempotency_ttl,
        )
        self._policy = policy
        policy_args = policy.args if policy is not None else (b"0", b"0")
        self._cells: dict[str, tuple[int, bytes]] = {}
        # Encoded once: the stream key, and the arguments around the time received.
        self._stream_part = encode_bulk_strings([self._stream_key])
        self._fixed_part = encode_bulk_strings(self._fixed_args)
        self._policy_part = encode_bulk_strings(policy_args)
        self._fixed_count = len(self._fixed_args) + 1 + len(policy_args)
        self._pending: list[_Pending] = []
        # Idle flushers wait on one future, made with the loop at hand (cheaper than an
        # asyncio.Event, which looks the loop up on every wait).
        self._wakeup: asyncio.Future[None] | None = None
        # Per flusher, when its write left (loop time; 0 while idle): one watchdog times
        # them all out instead of a timer armed and cancelled per write.
        self._write_started = [0.0] * max_in_flight
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.stored = 0
        self.duplicates = 0
        self.refused = 0
        self.failed = 0
        self.batches = 0
        self.last_success = 0.0
        self.last_failure = 0.0

    @property
    def pending(self) -> int:
        return len(self._pending) + self._in_flight

    @property
    def healthy(self) -> bool:
        return self.last_success >= self.last_failure

    def submit(
        self, device_id: str, seq: int, payload: bytes, trace: bytes = b""
    ) -> asyncio.Future[WriteResult]:
        """Queue a batch; the future holds what Redis decided for it (``WriteResult``).
        ``trace``: the traceparent to store with it, for a sampled request."""
        future: asyncio.Future[WriteResult] = self._loop.create_future()
        self.submit_to(device_id, seq, payload, future, trace)
        return future

    def submit_to(
        self, device_id: str, seq: int, payload: bytes, waiter: Waiter, trace: bytes = b""
    ) -> None:
        """Queue a batch whose outcome goes to ``waiter`` (called from the flusher's task)."""
        if len(self._pending) >= self._max_pending:
            raise StoreUnavailableError("write queue full")
        self._pending.append(_Pending(device_id, seq, payload, waiter, trace))
        self._idle.clear()
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)

    async def run(self) -> None:
        # One flusher per write allowed in flight, pipelined on the one connection (Redis
        # runs the scripts in the order sent); long-lived, so no task is made per batch.
        tasks = [asyncio.create_task(self._flush(i)) for i in range(self._max_in_flight)]
        tasks.append(asyncio.create_task(self._watch()))
        try:
            await asyncio.gather(*tasks)
        finally:
            await cancel_and_wait(tasks)

    async def _flush(self, flusher: int) -> None:
        loop = self._loop
        while True:
            if not self._pending:
                if not self._in_flight:
                    self._idle.set()
                wakeup = self._wakeup
                if wakeup is None:
                    wakeup = self._wakeup = loop.create_future()
                await wakeup
                continue
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._in_flight += len(batch)
            self._write_started[flusher] = loop.time()
            try:
                await self._write(batch)
            finally:
                self._write_started[flusher] = 0.0
                self._in_flight -= len(batch)

    async def _watch(self) -> None:
        """A write unanswered for ``timeout`` drops the connection: it and every write in
        flight behind it on the same connection fail at once (503), and the next write
        reconnects. Checked four times per ``timeout``, so a write fails within 1.25 of it."""
        loop = self._loop
        while True:
            await asyncio.sleep(self._timeout / 4)
            overdue = loop.time() - self._timeout
            if any(0.0 < started <= overdue for started in self._write_started):
                self._redis.abort(TimeoutError(f"no reply from Redis within {self._timeout} s"))

    async def drain(self) -> None:
        """Wait until everything submitted so far has been answered."""
        await self._idle.wait()

    def _device_keys(self, device_id: str) -> tuple[int, bytes]:
        """A device's keys (its seen-set, then a GCRA cell per window), RESP-encoded once:
        devices are few and write again and again. (count, encoded)."""
        cells = self._cells.get(device_id)
        if cells is None:
            if len(self._cells) >= 100_000:
                self._cells.clear()
            keys = [self._seen_prefix + device_id.encode()]
            if self._policy is not None:
                name = self._policy.name
                keys += [
                    self._keys.ingest_rate_limit(name, w.name, device_id).encode()
                    for w in self._policy.windows
                ]
            cells = self._cells[device_id] = (len(keys), encode_bulk_strings(keys))
        return cells

    def _command(self, batch: list[_Pending]) -> bytes:
        """``EVALSHA`` of the write script for ``batch``, as RESP: the parts that do not
        change are encoded once, a batch adds one formatted chunk per item."""
        parts = [b"", self._stream_part]
        nkeys = 1
        for item in batch:
            count, encoded = self._device_keys(item.device_id)
            nkeys += count
            parts.append(encoded)
        received = b"%d" % (time.time_ns() // 1_000_000)
        parts += (
            self._fixed_part,
            b"$%d\r\n%s\r\n" % (len(received), received),
            self._policy_part,
        )
        for item in batch:
            seq = b"%d" % item.seq
            payload = item.payload
            trace = item.trace
            parts.append(
                b"$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                % (len(seq), seq, len(payload), payload, len(trace), trace)
            )
        nkeys_arg = b"%d" % nkeys
        parts[0] = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            3 + nkeys + self._fixed_count + 3 * len(batch),
            len(_WRITE_BATCH_SHA),
            _WRITE_BATCH_SHA,
            len(nkeys_arg),
            nkeys_arg,
        )
        return b"".join(parts)

    async def _execute(self, command: bytes) -> list[int]:
        try:
            result: list[int] = await self._redis.execute(command)
        except ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
            # First use on this server (or after a restart / SCRIPT FLUSH): load and retry.
            await self._redis.execute(_LOAD_SCRIPT)
            result = await self._redis.execute(command)
        return result

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            results = await self._execute(self._command(batch))
        except (RedisError, OSError, TimeoutError) as e:
            self.failed += len(batch)
            self.last_failure = time.time()
            error = StoreUnavailableError(f"redis did not accept the write: {type(e).__name__}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        self.batches += 1
        self.last_success = time.time()
        for i, item in enumerate(batch):
            k = 5 * i
            result = WriteResult(
                results[k], results[k + 1], results[k + 2], results[k + 3], results[k + 4]
            )
            stored = result.stored
            if stored == STORED:
                self.stored += 1
            elif stored == DUPLICATE:
                self.duplicates += 1
            else:
                self.refused += 1
            if not item.future.done():
                item.future.set_result(result)


class BacklogMonitor:
    """Polls how many readings await a consumer; the hot path only reads a flag.

    With a consumer group, the backlog is the largest ``lag + pending`` of any group (entries
    not yet delivered plus delivered but unacknowledged); without one, the stream's length.
    The guard is as exact as the polling interval: it may overshoot by one interval's traffic.
    """

    def __init__(self, redis: Redis, keys: Keys, *, limit: int, interval: float) -> None:
        self._redis = redis
        self._stream = keys.readings
        self._limit = limit
        self._interval = interval
        self.backlog = 0
        self.exceeded = False

    async def measure(self) -> int:
        length = int(await self._redis.xlen(self._stream))
        if length == 0:
            return 0
        groups = await self._redis.xinfo_groups(self._stream)
        if not groups:
            return length
        backlog = 0
        for group in groups:
            lag = group.get("lag")
            waiting = length if lag is None else int(lag)
            backlog = max(backlog, waiting + int(group.get("pending", 0)))
        return backlog

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(max(self._interval, 1.0)):
                    self.backlog = await self.measure()
                self.exceeded = self.backlog > self._limit
            except (RedisError, OSError, TimeoutError):
                pass  # the writer and the health checker report Redis trouble
            await asyncio.sleep(self._interval)
