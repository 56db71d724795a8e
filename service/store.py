"""Durable group commit of device batches to the readings stream.

One flusher task owns the Redis connection. A request appends its batch to the pending list
and awaits a future; if fewer than ``max_in_flight`` writes are in flight the batch goes at
once, otherwise it joins the next write, which leaves as soon as one in flight returns. So
concurrent requests share one round trip (one transaction, below) without any idle wait,
the loop is not left idle while a write travels, and a request is answered only after
Redis has accepted its batch (and, with replicated acks, ``ack_replicas`` replicas have:
``service/replication.py``).
"""

import asyncio
import hashlib
import math
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

import hiredis
import msgspec
from redis.exceptions import RedisError, ResponseError

from shared.keys import Keys, PartitionKeys
from shared.readings import BATCHES_FIELD, RECEIVED_FIELD, TRACE_FIELD, trace_field
from shared.redisclient import RedisClient
from shared.tasks import cancel_and_wait

from .fastpath.resp import RespConnection, encode_bulk_strings, encode_command
from .ratelimit import GCRA_LUA, Policy

__all__ = (
    "DUPLICATE",
    "NOT_ATTEMPTED",
    "NO_POLICY",
    "STORED",
    "WRITE_CONNECTION_SETUP",
    "BacklogMonitor",
    "ReadingsWriter",
    "StoreUnavailableError",
    "WriteResult",
)

# One write is one transaction sent at once: ``MULTI``, ``XADD``, ``EVALSHA``, ``EXEC``. The
# ``XADD`` adds one stream entry carrying every batch of the write (shared/readings.py); the
# script then decides, per batch in order, the device's rate limit (GCRA, see ratelimit.py)
# and idempotency. When every batch is stored (nearly always) the entry stays as added;
# otherwise the script replaces it with one carrying only the stored batches, or removes it.
# So payloads pass through Lua only on that rare path: every byte entering Lua is hashed
# (Redis hashes whole strings), which made the payloads the largest cost of a write when
# the script added the entry itself (BENCHMARKS.md).
#
# A device's state is one record: its GCRA TATs and its idempotency window. Seen are the
# seqs in [low, top] (top: the highest stored; low: the first this record knew) less those
# missing, which a ring of ``window`` bits over (top - window, top] marks while any are
# (``missing`` counts them; the ring is the hash field ``<device>#``, there only then). A
# seq above top is new (the ones it skips become missing); one in the window is new only if
# missing; one below low or older than the window is unknown and stored again (the worker
# is idempotent on (device_id, seq) as well). Records live in one hash per generation of
# ``generation`` ms (ARGV[1], a prefix, and the generation's number, on Redis's clock): a
# write reads its devices from the current generation, else the one before, and writes them
# to the current one, which expires at the end of the next generation. So a record outlives
# its device's last batch by at least one generation, and a write costs a few commands
# whatever its number of batches. A record (little-endian): the count of TATs (a byte), the window
# it was kept with (uint32), top, low and missing, then the TATs (doubles: exact for seqs up
# to 2^53). TATs of another count (the policy changed) are dropped; under another window
# nothing below top is known any more.
#
# The generation keys are named here, not in KEYS: they share the stream's hash tag, so on a
# cluster they are in its slot. KEYS holds the stream alone: while the slot migrates, a
# command of one key is let in on the node the slot goes to (after ``ASK``), where one of
# several keys, some not there yet (the prefix never is a key), would be refused
# (``TRYAGAIN``) until the migration ends. The shebang makes Redis check memory once,
# before the script runs, so no command in it fails for lack of memory. The script first
# checks that the ``XADD`` before it could run (the key is a stream); if not, it changes
# nothing.
#
# KEYS: the stream.
# ARGV: the state hashes' prefix, window (bits, a multiple of 8), generation (ms), received
# ms (the entry's), window count, shadow, (limit, period ms) per policy window, then per
# batch its device and seq.
# Reply: two integers per batch: (stored + 1) + 4 verdict + 16 window + 1024 remaining, then
# reset (WriteResult's fields).
_DECIDE_LUA = (
    "#!lua\n"
    + GCRA_LUA
    + string.Template(r"""
local stream = KEYS[1]
if redis.call('TYPE', stream)['ok'] ~= 'stream' then
  return redis.error_reply('WRONGTYPE the readings key is not a stream')
end
local state_prefix = ARGV[1]
local window = tonumber(ARGV[2])
local nbytes = window / 8
local generation = tonumber(ARGV[3])
local received = ARGV[4]
local nw = tonumber(ARGV[5])
local shadow = tonumber(ARGV[6])
local periods, intervals, nexts = {}, {}, {}
for w = 1, nw do
  periods[w] = tonumber(ARGV[6 + 2 * w])
  intervals[w] = periods[w] / tonumber(ARGV[5 + 2 * w])
end
local first = 7 + 2 * nw
local nb = (#ARGV - first + 1) / 2
local now = redis_now_ms()
local gen = math.floor(now / generation)
local current = state_prefix .. string.format('%d', gen)
local previous = state_prefix .. string.format('%d', gen - 1)
local CHUNK = 1000
local band, bor, lshift = bit.band, bit.bor, bit.lshift
local byte, char, sub = string.byte, string.char, string.sub
local unpack_record = struct.unpack

-- Commands over a long list in slices (Lua's unpack has a limit).
local function hmget(key, fields)
  if #fields <= CHUNK then return redis.call('HMGET', key, unpack(fields)) end
  local out = {}
  for from = 1, #fields, CHUNK do
    local got = redis.call('HMGET', key, unpack(fields, from, math.min(from + CHUNK - 1, #fields)))
    for j = 1, #got do out[from + j - 1] = got[j] end
  end
  return out
end

-- A device's state: its TATs (state[1..nw]), top, low and missing (see above), its ring
-- while seqs are missing, and whether the record (dirty) or the ring changed.
local function state_of(record)
  if not record then
    return {top = -1, low = -1, missing = 0, dirty = false, ring = false, ring_dirty = false}
  end
  local n, kept_with, top, low, missing, pos = unpack_record('<BIddd', record)
  if kept_with ~= window then low, missing = top, 0 end
  local state = {top = top, low = low, missing = missing, dirty = false, ring = false,
    ring_dirty = false}
  if n == nw then
    for w = 1, nw do state[w], pos = unpack_record('<d', record, pos) end
  end
  return state
end

-- Every device once (states[device]), and its state.
local devices, states = {}, {}
for i = first, #ARGV, 2 do
  local device = ARGV[i]
  if not states[device] then
    devices[#devices + 1] = device
    states[device] = true
  end
end
local records = hmget(current, devices)
local absent, gapped = {}, {}
for k = 1, #devices do
  local record = records[k]
  if record then
    local state = state_of(record)
    states[devices[k]] = state
    if state.missing > 0 then gapped[#gapped + 1] = devices[k] end
  else
    absent[#absent + 1] = devices[k]
  end
end

local function load_rings(key, names)
  local fields = {}
  for j = 1, #names do fields[j] = names[j] .. '#' end
  local got = hmget(key, fields)
  for j = 1, #names do
    local state, ring = states[names[j]], got[j]
    if ring and #ring == nbytes then
      state.ring = ring
    else
      -- Lost, or of another window: nothing below top is known any more.
      state.low, state.missing = state.top, 0
    end
  end
end
if #gapped > 0 then load_rings(current, gapped) end
if #absent > 0 then
  local older = hmget(previous, absent)
  gapped = {}
  for j = 1, #absent do
    local state = state_of(older[j])
    state.dirty = true
    states[absent[j]] = state
    if state.missing > 0 then
      gapped[#gapped + 1] = absent[j]
      state.ring_dirty = true
    end
  end
  if #gapped > 0 then load_rings(previous, gapped) end
end

-- The ring's byte and bit mask for a seq.
local function slot(seq)
  local p = seq % window
  if p < 0 then p = p + window elseif p >= window then p = p - window end
  return math.floor(p / 8) + 1, lshift(1, p % 8)
end

local function ring_bytes(ring)
  local bytes = {}
  if not ring then
    for at = 1, nbytes do bytes[at] = 0 end
    return bytes
  end
  for at = 1, nbytes, CHUNK do
    local part = {byte(ring, at, math.min(at + CHUNK - 1, nbytes))}
    for j = 1, #part do bytes[at + j - 1] = part[j] end
  end
  return bytes
end

local function ring_string(bytes)
  local parts = {}
  for at = 1, nbytes, CHUNK do
    parts[#parts + 1] = char(unpack(bytes, at, math.min(at + CHUNK - 1, nbytes)))
  end
  return table.concat(parts)
end

-- Whether seq is new to the device (but the next seq of a device missing none: the loop
-- below decides that, nearly every batch, itself); if so it is marked seen. Seen: [low,
-- top] but the seqs the ring marks missing; top = -1 before the first. Below low (and
-- below the window), a seq is unknown: taken as new, and not remembered.
local function first_time(state, seq)
  local top = state.top
  if top < 0 or seq - top >= window then
    state.top, state.low, state.missing = seq, seq, 0
    if state.ring then state.ring, state.ring_dirty = false, true end
    return true
  end
  if seq > top then
    -- The slots of top+1 .. seq now stand for these seqs: the ones skipped are missing.
    local bytes, miss = ring_bytes(state.ring), state.missing
    for s = top + 1, seq do
      local at, mask = slot(s)
      if band(bytes[at], mask) ~= 0 then miss = miss - 1 end
      if s < seq then
        bytes[at] = bor(bytes[at], mask)
        miss = miss + 1
      else
        bytes[at] = band(bytes[at], 255 - mask)
      end
    end
    state.top, state.missing, state.ring_dirty = seq, miss, true
    state.ring = miss > 0 and ring_string(bytes)
    return true
  end
  if seq <= top - window or seq < state.low then return true end
  local ring = state.ring
  if not ring then return false end
  local at, mask = slot(seq)
  local b = byte(ring, at)
  if band(b, mask) == 0 then return false end
  state.missing, state.ring_dirty = state.missing - 1, true
  state.ring = sub(ring, 1, at - 1) .. char(b - mask) .. sub(ring, at + 1)
  return true
end

-- Each batch in order: the rate limit, then idempotency. Two integers per batch: stored
-- + 1, verdict, window and remaining packed in one (see WriteResult), then reset. (The
-- reply starts as a copy of the batches' arguments: a table made at its size at once; past
-- what unpack takes, it grows.)
local out, all_stored = {}, true
if nb <= CHUNK then out = {unpack(ARGV, first, #ARGV)} end
for i = 0, nb - 1 do
  local state = states[ARGV[first + 2 * i]]
  local verdict, deciding, remaining, reset = 0, 0, 0, 0
  if nw > 0 then
    verdict, deciding, remaining, reset =
      gcra_step(state, nw, periods, intervals, shadow, now, nexts)
    if verdict == 1 then state.dirty = true end
  end
  local stored = 0
  if verdict ~= 2 then
    local seq, top = tonumber(ARGV[first + 2 * i + 1]), state.top
    if seq == top + 1 and state.missing == 0 and top >= 0 then
      state.top, state.dirty, stored = seq, true, 2
    elseif first_time(state, seq) then
      state.dirty, stored = true, 2
    else
      stored = 1
    end
  end
  if stored ~= 2 then all_stored = false end
  out[2 * i + 1] = stored + 4 * verdict + 16 * deciding + 1024 * remaining
  out[2 * i + 2] = reset
end

-- Not every batch stored: the entry just added (the stream's last: this runs in the same
-- transaction) is replaced by one of the stored batches, in their order, or removed.
if not all_stored then
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  local fields = {}
  local pairs_in = last[2]
  for j = 1, #pairs_in, 2 do fields[pairs_in[j]] = pairs_in[j + 1] end
  local blob = fields['$batches'] or ''
  local batches, at = {}, 1
  while at <= #blob do
    local colon = string.find(blob, ':', at, true)
    local stop = colon + tonumber(sub(blob, at, colon - 1))
    batches[#batches + 1] = sub(blob, colon + 1, stop)
    at = stop + 2
  end
  if fields['$received'] ~= received or #batches ~= nb then
    return redis.error_reply('ERR the readings stream does not end with this write')
  end
  redis.call('XDEL', stream, last[1])
  local kept, traces = {}, {}
  local function add()
    if #kept == 0 then return end
    redis.call('XADD', stream, '*', '$received', received, '$batches', table.concat(kept),
      unpack(traces))
    kept, traces = {}, {}
  end
  for i = 0, nb - 1 do
    if out[2 * i + 1] % 4 == 2 then
      local batch = batches[i + 1]
      kept[#kept + 1] = #batch .. ':' .. batch .. ','
      local trace = fields['$trace' .. i]
      if trace then
        traces[#traces + 1] = '$trace' .. (#kept - 1)
        traces[#traces + 1] = trace
      end
      if #kept == CHUNK then add() end
    end
  end
  add()
end

-- The states changed, into the current generation (a ring only while seqs are missing).
local changed = {}
local header = '<BIddd' .. string.rep('d', nw)
local values = {nw, window}
for k = 1, #devices do
  local device = devices[k]
  local state = states[device]
  if state.dirty or state.ring_dirty then
    values[3], values[4], values[5] = state.top, state.low, state.missing
    for w = 1, nw do values[5 + w] = state[w] or 0 end
    changed[#changed + 1] = device
    changed[#changed + 1] = struct.pack(header, unpack(values))
    if state.ring_dirty and state.ring then
      changed[#changed + 1] = device .. '#'
      changed[#changed + 1] = state.ring
    end
  end
end
-- A hash gets its expiry with its first fields (new fields only come with new devices).
local added = 0
for from = 1, #changed, 2 * CHUNK do
  added = added + redis.call('HSET', current,
    unpack(changed, from, math.min(from + 2 * CHUNK - 1, #changed)))
end
if added > 0 then
  redis.call('PEXPIREAT', current, string.format('%d', (gen + 2) * generation))
end
return out
""").substitute(
        batches=BATCHES_FIELD.decode(), received=RECEIVED_FIELD.decode(), trace=TRACE_FIELD.decode()
    )
)

# What a batch's result says it became (``WriteResult.stored``).
STORED: Final = 1
DUPLICATE: Final = 0
NOT_ATTEMPTED: Final = -1  # the rate limit refused the batch: no idempotency check, no write
# ``WriteResult.verdict`` without an ingest policy; with one, the GCRA's code
# (``ratelimit.ALLOWED``, ``REFUSED``, ``SHADOWED``).
NO_POLICY: Final = 0


class WriteResult(msgspec.Struct, frozen=True, gc=False):
    """What Redis answered for one batch (the script packs it in two integers).

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
_DECIDE_SHA = hashlib.sha1(_DECIDE_LUA.encode()).hexdigest().encode()  # noqa: S324
_LOAD_SCRIPT = encode_command([b"SCRIPT", b"LOAD", _DECIDE_LUA.encode()])
# What the write connection sends first whenever it connects (``RespConnection``'s
# ``setup``): the script is then there before any write, as a write must never meet
# NOSCRIPT (its XADD would stand undecided; see ``ReadingsWriter._execute``).
WRITE_CONNECTION_SETUP: Final = (_LOAD_SCRIPT,)
_MULTI = encode_command([b"MULTI"])
_EXEC = encode_command([b"EXEC"])


class ReadingsWriter:
    def __init__(
        self,
        redis: RespConnection,
        keys: Keys | PartitionKeys,
        *,
        max_batch: int,
        max_pending: int,
        max_in_flight: int,
        timeout: float,
        idempotency_window: int,
        idempotency_ttl: int,
        policy: Policy | None = None,
        ack_replicas: int = 0,
        ack_timeout: float = 0.5,
    ) -> None:
        self._redis = redis
        # Looked up once: on Python 3.11 every get_running_loop() is a getpid() syscall.
        self._loop = asyncio.get_running_loop()
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._timeout = timeout
        # The ring of seqs in whole bytes; a generation at least a record's lifetime, and as
        # long as any policy window, so that no TAT still ahead is forgotten.
        window_bits = -(-idempotency_window // 8) * 8
        generation_ms = idempotency_ttl * 1000
        if policy is not None:
            generation_ms = max(generation_ms, *(math.ceil(w.period_ms) for w in policy.windows))
        policy_args = policy.args if policy is not None else (b"0", b"0")
        # Encoded once: the keys, the arguments around the time received, the field names.
        stream = keys.readings.encode()
        self._stream = stream
        self._xadd_part = encode_bulk_strings([stream, b"*", RECEIVED_FIELD])
        self._batches_field = encode_bulk_strings([BATCHES_FIELD])
        state_prefix = keys.ingest_state_prefix.encode()
        self._decide_part = encode_bulk_strings(
            [_DECIDE_SHA, b"1", stream, state_prefix, b"%d" % window_bits, b"%d" % generation_ms]
        )
        self._policy_part = encode_bulk_strings(policy_args)
        self._decide_count = 8 + len(policy_args)
        self._trace_fields = [encode_bulk_strings([trace_field(i)]) for i in range(max_batch)]
        self._devices: dict[str, bytes] = {}
        # Replicated acks: after a write, WAIT for that many replicas, at most that long (one
        # WAIT answers for every write sent before it: see ``_replicated``); while the
        # health checker sees fewer online (``replicas_online``), refuse at once.
        self.ack_replicas = ack_replicas
        self._sent = 0  # writes sent on the connection so far
        # The WAIT in flight: the connection it went on, the writes it covers, its reply.
        self._waiting: tuple[int, int, asyncio.Future[int]] | None = None
        self.waits = 0  # WAITs sent
        self._replicas_online: int | None = None
        self._replicas_short = False
        wait_ms = max(1, round(ack_timeout * 1000))
        self._wait = (
            encode_command([b"WAIT", b"%d" % ack_replicas, b"%d" % wait_ms])
            if ack_replicas
            else b""
        )
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
        # Batches stored but answered 503: fewer replicas than ``ack_replicas`` had them in time.
        self.unreplicated = 0
        # Writes whose script was not loaded on the server (flushed meanwhile): their entry
        # was removed and the write sent again.
        self.reloads = 0
        self.batches = 0
        # Stream entries added (writes that stored at least one batch), and the batches they
        # carry: their mean is ``batches_per_entry``.
        self.entries = 0
        self.entry_batches = 0
        self.last_success = 0.0
        self.last_failure = 0.0

    @property
    def replicas_online(self) -> int | None:
        """Replicas the last look at Redis found online (None: not looked yet)."""
        return self._replicas_online

    @replicas_online.setter
    def replicas_online(self, count: int | None) -> None:
        self._replicas_online = count
        self._replicas_short = count is not None and count < self.ack_replicas

    @property
    def batches_per_entry(self) -> float:
        """The mean number of batches in the entries this writer added (1 before any)."""
        return self.entry_batches / self.entries if self.entries else 1.0

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
        if self._replicas_short:
            raise StoreUnavailableError("fewer replicas online than acks wait for")
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

    def _device(self, device_id: str) -> bytes:
        """A device's id as a RESP bulk string, encoded once: devices write again and again."""
        encoded = self._devices.get(device_id)
        if encoded is None:
            if len(self._devices) >= 100_000:
                self._devices.clear()
            raw = device_id.encode()
            encoded = self._devices[device_id] = b"$%d\r\n%s\r\n" % (len(raw), raw)
        return encoded

    def transaction(self, batches: Iterable[tuple[str, int, bytes]]) -> bytes:
        """The write's transaction for these (device, seq, payload) batches, as the writer
        sends it (bench/writecost.py measures its parts)."""
        waiter: asyncio.Future[WriteResult] = self._loop.create_future()
        return self._command([_Pending(d, s, p, waiter, b"") for d, s, p in batches])

    def _command(self, batch: list[_Pending]) -> bytes:
        """The write's transaction for ``batch``, as RESP (``MULTI``, ``XADD``, ``EVALSHA``,
        ``EXEC``, and ``WAIT`` for replicated acks): the parts that do not change are
        encoded once, a batch adds a few formatted chunks."""
        received = b"%d" % (time.time_ns() // 1_000_000)
        received_part = b"$%d\r\n%s\r\n" % (len(received), received)
        trace_fields = self._trace_fields
        device = self._device
        # The batches as netstrings, in one bulk string; traces after it.
        frames = [b"", self._batches_field, b""]
        size = 0
        traces: list[bytes] = []
        decide = [b"", self._decide_part, received_part, self._policy_part]
        for i, item in enumerate(batch):
            payload = item.payload
            head = b"%d:" % len(payload)
            size += len(head) + len(payload) + 1
            frames += (head, payload, b",")
            trace = item.trace
            if trace:
                traces += (trace_fields[i], b"$%d\r\n%s\r\n" % (len(trace), trace))
            seq = b"%d" % item.seq
            decide += (device(item.device_id), b"$%d\r\n%s\r\n" % (len(seq), seq))
        frames[0] = b"*%d\r\n$4\r\nXADD\r\n%s%s" % (7 + len(traces), self._xadd_part, received_part)
        frames[2] = b"$%d\r\n" % size
        frames.append(b"\r\n")
        decide[0] = b"*%d\r\n$7\r\nEVALSHA\r\n" % (self._decide_count + 2 * len(batch))
        return b"".join([_MULTI, *frames, *traces, *decide, _EXEC])

    async def _execute(self, command: bytes) -> tuple[list[int], int, int]:
        """The script's reply for the write ``command``, the connection it went on and the
        number it was sent as (``_replicated`` waits for both)."""
        for attempt in (1, 2):
            self._sent += 1
            sent = self._sent
            executed = await self._redis.execute(command, skip=3)
            generation = self._redis.generation
            if executed is None:
                raise ResponseError("the write's transaction was aborted")
            entry_id, decided = executed
            if isinstance(entry_id, hiredis.ReplyError):
                raise ResponseError(str(entry_id))
            if not isinstance(decided, hiredis.ReplyError):
                return decided, generation, sent
            # The entry stands undecided: it goes before anything else can happen.
            await self._redis.execute(encode_command([b"XDEL", self._stream, entry_id]))
            if attempt == 2 or not str(decided).startswith("NOSCRIPT"):
                raise ResponseError(str(decided))
            # The script was flushed from the server since this connection loaded it.
            self.reloads += 1
            await self._redis.execute(_LOAD_SCRIPT)
        raise AssertionError("unreachable")

    async def _replicated(self, generation: int, sent: int) -> int:
        """How many replicas have every write up to the ``sent``-th: a ``WAIT`` sent after it
        on the same connection answers for all of them (Redis counts a client's writes by
        replication offset; on another connection it would answer for none). So a WAIT in
        flight that was sent after this write is shared; otherwise a new one goes, and the
        writes that return while it blocks the connection share the next one."""
        waiting = self._waiting
        if waiting is None or waiting[0] != generation or waiting[1] < sent:
            self.waits += 1
            reply = asyncio.ensure_future(self._redis.execute(self._wait, generation=generation))
            # Retrieved here whatever happens to the writes waiting on it.
            reply.add_done_callback(lambda f: f.cancelled() or f.exception())
            waiting = self._waiting = (generation, self._sent, reply)
        # Shielded: a write's task cancelled (shutdown) must not cancel the others' WAIT.
        replicas: int = await asyncio.shield(waiting[2])
        return replicas

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            results, generation, sent = await self._execute(self._command(batch))
            replicas = await self._replicated(generation, sent) if self.ack_replicas else 0
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
        added = 0  # batches the write's entry carries
        unreplicated = None
        if replicas < self.ack_replicas:
            unreplicated = StoreUnavailableError(
                f"the write reached {replicas} of {self.ack_replicas} replicas in time"
            )
        for i, item in enumerate(batch):
            packed = results[2 * i]
            result = WriteResult(
                (packed & 3) - 1,
                (packed >> 2) & 3,
                (packed >> 4) & 63,
                packed >> 10,
                results[2 * i + 1],
            )
            stored = result.stored
            if stored == STORED:
                added += 1
            if stored == NOT_ATTEMPTED:
                self.refused += 1
            elif unreplicated is not None:
                # Stored on the primary, or stored before (a duplicate), but not known to be
                # on enough replicas: no ack. A retry is a duplicate, acknowledged once a
                # later write is replicated (WAIT covers everything written before it).
                self.unreplicated += 1
                if not item.future.done():
                    item.future.set_exception(unreplicated)
                continue
            elif stored == STORED:
                self.stored += 1
            else:
                self.duplicates += 1
            if not item.future.done():
                item.future.set_result(result)
        if added:
            self.entries += 1
            self.entry_batches += added


class BacklogMonitor:
    """How many readings of one partition await a consumer (``partitions.PartitionedBacklog``
    polls every partition's and keeps the flag the hot path reads).

    With a consumer group, the backlog is the largest ``lag + pending`` of any group (entries
    not yet delivered plus delivered but unacknowledged); without one, the stream's length.
    An entry carries a write's batches, so the entries are counted as batches by the mean
    number of batches in this process's entries (``batches_per_entry``): the limit stays one
    of batches. The guard is as exact as the polling interval and that mean: it may overshoot
    by one interval's traffic.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys | PartitionKeys,
        *,
        batches_per_entry: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self._redis = redis
        self._stream = keys.readings
        self._batches_per_entry = batches_per_entry
        self.backlog = 0

    async def measure(self) -> int:
        """The backlog in batches (entries counted by ``batches_per_entry``)."""
        return round(await self.entries() * self._batches_per_entry())

    async def entries(self) -> int:
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
