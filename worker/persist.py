"""Readings from the Redis stream to Postgres: exactly once in ``readings``, whatever crashes.

One consumer group (``persist``) on the readings stream; every worker process is a consumer
of its own. A stream entry carries the batches of one write of the service (``d0``, ``d1``,
...; or one batch, ``d``, in the format older services wrote: ``shared/readings.py``), and a
row of ``readings`` is one batch, known here by its entry and its index there (``Row``). A
round reads up to ``WORKER_BATCH`` entries (``XREADGROUP``), copies their batches into a
per-connection temporary table with one ``COPY`` and inserts them into ``readings`` with
``ON CONFLICT (device_id, ts, seq) DO NOTHING``; the device status and the vital alert rules
are updated in the same transaction. An entry is acknowledged (``XACK``) only after the
commit, and only once every one of its batches is stored or dead-lettered. So a crash before
the commit leaves it pending and its batches are stored later; a crash between commit and
acknowledgement has it delivered again, and the conflict clause keeps its batches from
being stored twice.

Entries a dead consumer left pending (its process's heartbeat is gone, or is another
process's: ``worker.consumers``) are claimed at once, before any new entry is read; any
entry idle for ``WORKER_CLAIM_IDLE`` is claimed (``XAUTOCLAIM``) as well. While Postgres is
unavailable the round is retried with backoff (no new entries are read meanwhile, and
retries do not count as deliveries).

Dead letters are per batch. An entry whose fields are no entry at all (no receive time, no
batch) goes to the dead-letter stream whole, at once. A batch that is not a valid batch goes
there alone, in the one-batch format and with its index in the entry (``dl_index``), and its
entry's other batches are stored; an entry in the one-batch format is its one batch, so its
dead letter is the entry as it was, without an index. A batch Postgres refuses is found by
trying the round's batches one by one (each in a savepoint); its reason is recorded in the
errors hash (under the entry id for an entry in the one-batch format, ``<id>/<index>`` for a
batch of an entry of several), its entry's other batches are stored, and the entry stays
pending until the delivery that reaches ``WORKER_DEAD_LETTER_AFTER``, when that batch goes
to the dead-letter stream. An entry delivered more often than that without being
acknowledged (one that crashes its consumer, say) has each of its batches dead-lettered, as
refused if a reason is recorded for it, else as redelivered, without decoding them.

A dead letter is added in the same ``MULTI`` as the acknowledgement of its entry. An entry
none of whose batches is to be stored is settled so before the commit; the dead batches of
one with batches to store wait for the commit and are added, the entry acknowledged, after
it. So a crash never leaves a batch dead-lettered with its entry pending, to be
dead-lettered again at the next delivery; the price is that an undecodable batch in an
entry with a batch Postgres refuses waits with that entry, and goes when the refused one
does. Two windows remain for a second dead letter of the same batch: a connection lost
after Redis ran the ``MULTI`` but before its reply came (the step is retried: the
acknowledgement is idempotent, the ``XADD`` not), and an entry claimed for being idle from a
consumer still working on it (both may settle it).

Trimming (``StreamJanitor``): an entry may go only once every consumer group has
acknowledged it. For each group the first entry it may still need is its oldest pending
entry, or, with nothing pending, the one after its last-delivered id; the stream is trimmed
(``XTRIM MINID``, exact) below the smallest of these over all groups, and not at all while it has
no group.
"""

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from loguru import logger
from opentelemetry.trace import SpanKind
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from shared.keys import Keys, PartitionKeys
from shared.readings import (
    BATCH_FIELD,
    PERSIST_GROUP,
    EntryError,
    ReadingsEntry,
    decode_entries,
    encode_dead_letter,
    encode_entry,
)
from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.reporting import Telemetry
from shared.telemetry import dead_letter_record, persist_record
from shared.tracing import Tracing, links_from, remote_context
from shared.wire import BatchError, decode_stored_batch, stored_samples

from .alerts import AlertChange, AlertEvaluator, Evaluation, update_device_status
from .consumers import DeadConsumers
from .groups import Delivery, GroupReader

__all__ = (
    "STAGING_DDL",
    "ReadingsPersister",
    "Row",
    "StreamJanitor",
    "UndecodableBatch",
    "UndecodableError",
    "decode_rows",
    "ensure_partitions",
    "safe_trim_id",
)

# Created on every pooled connection (the pool's ``configure``); emptied by every commit.
STAGING_DDL = """
    CREATE TEMP TABLE IF NOT EXISTS readings_staging (
        device_id   text NOT NULL,
        seq         bigint NOT NULL,
        ts_ms       bigint NOT NULL,
        rate_hz     real NOT NULL,
        ppg         double precision[] NOT NULL,
        hr          real,
        spo2        real,
        received_ms bigint NOT NULL
    ) ON COMMIT DELETE ROWS
"""
_COPY = (
    "COPY readings_staging (device_id, seq, ts_ms, rate_hz, ppg, hr, spo2, received_ms) FROM STDIN"
)
_INSERT = """
    WITH inserted AS (
        INSERT INTO readings (device_id, seq, ts, rate_hz, ppg, hr, spo2, received_at)
        SELECT device_id, seq, to_timestamp(ts_ms / 1000.0), rate_hz, ppg, hr, spo2,
            to_timestamp(received_ms / 1000.0)
        FROM readings_staging
        ON CONFLICT (device_id, ts, seq) DO NOTHING
        RETURNING device_id, seq, ts, hr, spo2, cardinality(ppg) AS samples
    )
    SELECT device_id, seq, round(extract(epoch FROM ts) * 1000)::bigint, hr, spo2, samples
    FROM inserted
"""

# A JSON array of numbers becomes a Postgres array literal by swapping its brackets; the
# whitespace must not break a COPY line.
_TO_PG_ARRAY = bytes.maketrans(b"[]\t\r\n", b"{}   ")
_NULL = b"\\N"
# A sample whose text is not 0 but too small for a double ("1e-400") is 0 to the service's
# decoder (and to every JSON parser), while Postgres refuses the text: it is stored as the
# 0 the service acknowledged. Such a number is below 2.5e-324, so it has a negative exponent
# of three digits or more, or 224 or more zeros after the point (a two-digit exponent adds
# at most 99). Only arrays showing one of these shapes are searched for them (the shapes
# are found in a few µs per KB: literal searches, the exponent's in the array with its
# digits all made "d"), from a number's start and without backtracking: in linear time.
_EXPONENT_SHAPE = bytes.maketrans(b"E0123456789", b"edddddddddd")
_LONG_EXPONENT = re.compile(rb"e-ddd")
_ZERO_RUN = b"0" * 200
_UNDERFLOW_CANDIDATE = re.compile(
    rb"(?<![-+.0-9eE])"
    rb"(?:-?[0-9.]++[eE]-0*+[1-9][0-9]{2,}+|-?0\.0{200,}+[0-9]*+(?:[eE][-+]?[0-9]++)?+)"
)


@dataclass(frozen=True, slots=True)
class Row:
    """One decoded batch: its COPY line and what the worker needs besides. A batch is known
    by its entry and its index there (0 for an entry in the one-batch format)."""

    entry_id: bytes
    index: int
    device_id: str
    ts_ms: int
    samples: int
    line: bytes
    # The traceparent of the sampled request that wrote it (field ``t<index>``), if any.
    trace: bytes | None = None


@dataclass(frozen=True, slots=True)
class UndecodableBatch:
    """A batch of an entry that is not a valid batch: dead-lettered alone, why in ``reason``."""

    entry_id: bytes
    index: int
    batch: ReadingsEntry
    reason: str


class UndecodableError(ValueError):
    """Why fields give no row; from ``decode_rows``: they are no entry at all (so it is
    dead-lettered whole)."""


def _optional(value: float | None) -> bytes:
    return _NULL if value is None else repr(value).encode()


def _zero_if_underflowing(number: re.Match[bytes]) -> bytes:
    text = number[0]
    if float(text) != 0.0:
        return text
    return b"-0" if text[:1] == b"-" else b"0"


def _pg_array(raw: bytes) -> bytes:
    """The JSON array of numbers ``raw`` as a Postgres array literal of the same values."""
    if (
        (b"e" in raw or b"E" in raw) and _LONG_EXPONENT.search(raw.translate(_EXPONENT_SHAPE))
    ) or _ZERO_RUN in raw:
        raw = _UNDERFLOW_CANDIDATE.sub(_zero_if_underflowing, raw)
    return raw.translate(_TO_PG_ARRAY)


def decode_rows(entry_id: bytes, fields: dict[bytes, bytes]) -> list[Row | UndecodableBatch]:
    """Every batch of the entry, in order: its COPY line (text format), or why there is none.
    ``UndecodableError`` if the fields are no entry at all."""
    try:
        batches = decode_entries(fields)
    except EntryError as e:
        raise UndecodableError(str(e)) from e
    out: list[Row | UndecodableBatch] = []
    for index, entry in enumerate(batches):
        try:
            out.append(_row(entry_id, index, entry))
        except UndecodableError as e:
            out.append(UndecodableBatch(entry_id, index, entry, str(e)))
    return out


def _row(entry_id: bytes, index: int, entry: ReadingsEntry) -> Row:
    try:
        batch = decode_stored_batch(entry.batch)
    except BatchError as e:
        raise UndecodableError(f"not a valid batch: {e.message}") from e
    raw = bytes(batch.ppg)
    try:
        samples = stored_samples(raw)
    except BatchError as e:
        raise UndecodableError(e.message) from e
    line = b"%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n" % (
        batch.device_id.encode(),
        batch.seq,
        batch.ts,
        repr(batch.rate_hz).encode(),
        _pg_array(raw),
        _optional(batch.hr),
        _optional(batch.spo2),
        entry.received,
    )
    return Row(entry_id, index, batch.device_id, batch.ts, samples, line, entry.traceparent)


def _one_batch_format(fields: dict[bytes, bytes]) -> bool:
    """An entry in the first format (``d``, ``r``, ``t``): its one batch is the entry."""
    return BATCH_FIELD in fields


def _error_key(entry: Delivery, index: int) -> bytes:
    """The errors hash's field of a batch: the entry id for an entry in the one-batch format
    (as before entries carried several), ``<id>/<index>`` for one of several."""
    if _one_batch_format(entry.fields):
        return entry.entry_id
    return b"%s/%d" % (entry.entry_id, index)


def _error_keys(entry: Delivery) -> list[bytes]:
    """The errors hash's fields of every batch of ``entry`` (its id when it does not decode)."""
    try:
        count = len(decode_entries(entry.fields))
    except EntryError:
        return [entry.entry_id]
    return [_error_key(entry, i) for i in range(count)]


@dataclass(frozen=True, slots=True)
class _Dead:
    """A dead letter to add: a batch (``index``), or a whole entry (``index`` None: one
    that does not decode, or one in the one-batch format), with the fields it keeps."""

    entry: Delivery
    index: int | None
    fields: dict[bytes, bytes]
    kind: str
    reason: str


def _whole(entry: Delivery, kind: str, reason: str) -> _Dead:
    return _Dead(entry, None, entry.fields, kind, reason)


def _dead_batch(entry: Delivery, index: int, batch: ReadingsEntry, kind: str, reason: str) -> _Dead:
    """One batch's dead letter: the entry as it is when its one batch is the entry, else the
    batch in the one-batch format, with its index."""
    if _one_batch_format(entry.fields):
        return _whole(entry, kind, reason)
    fields = encode_entry(batch.batch, batch.received_ms, batch.traceparent)
    return _Dead(entry, index, fields, kind, reason)


async def ensure_partitions(pool: AsyncConnectionPool, *, days_ahead: int) -> int:
    """Daily partitions of ``readings`` from yesterday (UTC) to ``days_ahead`` days ahead."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT readings_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, %s)",
            (days_ahead + 2,),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def _id_tuple(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


async def safe_trim_id(redis: RedisClient, stream: str) -> bytes | None:
    """The first id some group may still need (everything below it is acknowledged)."""
    groups = await redis.xinfo_groups(stream)
    if not groups:
        return None
    firsts: list[tuple[int, int]] = []
    for group in groups:
        pending = await redis.xpending(stream, group["name"])
        if pending["pending"]:
            firsts.append(_id_tuple(pending["min"]))
        else:
            ms, seq = _id_tuple(group["last-delivered-id"])
            firsts.append((ms, seq + 1))
    ms, seq = min(firsts)
    return b"%d-%d" % (ms, seq)


def _transient(error: BaseException) -> bool:
    """Worth retrying the same round: Postgres away or busy, not refusing the data."""
    if isinstance(error, psycopg.DataError | psycopg.IntegrityError):
        return False
    return isinstance(error, psycopg.Error | OSError)


class ReadingsPersister:
    def __init__(
        self,
        redis: RedisClient,
        pool: AsyncConnectionPool,
        keys: Keys,
        *,
        consumer: str,
        batch: int,
        block_ms: int,
        claim_idle: float,
        dead_letter_after: int,
        dead_letter_maxlen: int,
        retry_max: float,
        alerts: AlertEvaluator,
        telemetry: Telemetry,
        on_alert: Callable[[AlertChange], None],
        on_late: Callable[[int], None] | None = None,
        on_persisted: Callable[[list[Row]], Awaitable[None]] | None = None,
        tracing: Tracing | None = None,
        partition: PartitionKeys | None = None,
    ) -> None:
        self._redis = redis
        self._tracing = tracing if tracing is not None else Tracing(provider=None)
        self._pool = pool
        # One partition's stream (the single one of P = 1 unless ``partition`` says).
        own = partition if partition is not None else keys.partitions(1)[0]
        self.partition = own
        self._stream = own.readings
        self._dead = own.readings_dead
        self._errors = own.readings_errors
        self._consumer = consumer
        self._dead_letter_after = dead_letter_after
        self._dead_letter_maxlen = dead_letter_maxlen
        self._retry_max = retry_max
        self._alerts = alerts
        self._telemetry = telemetry
        self._on_alert = on_alert
        self._on_late = on_late
        self._on_persisted = on_persisted
        self._reader = GroupReader(
            redis,
            self._stream,
            PERSIST_GROUP,
            consumer=consumer,
            count=batch,
            claim_idle=claim_idle,
            # An entry whose count is lost gets its last try (a rejected one is buried then).
            last_try=dead_letter_after,
            block_ms=block_ms,
            dead_consumers=DeadConsumers(
                redis,
                keys,
                self._stream,
                PERSIST_GROUP,
                consumer=consumer,
                min_idle_ms=min(max(1, int(claim_idle * 1000)), DeadConsumers.MIN_IDLE_MS),
            ),
            label="readings",
        )
        self._stopping = asyncio.Event()
        self.db_ok = True
        self.last_commit = 0.0
        self.rows = 0
        self.samples = 0
        self.duplicates = 0
        self.groups = 0
        self.dead_letters = 0
        self.rejected = 0
        # Set by the janitor: the persist group's lag + pending, and its lag alone (-1:
        # not measured yet).
        self.backlog = 0
        self.undelivered = -1

    @property
    def group_ready(self) -> bool:
        return self._reader.group_ready

    @property
    def claimed(self) -> int:
        """Entries taken over from other consumers (dead, or idle too long)."""
        return self._reader.claimed

    def stop(self) -> None:
        """Finish the round in hand, then return from ``run``."""
        self._stopping.set()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        await self._until_done("creating the consumer group", self._reader.ensure_group)
        while not self._stopping.is_set():
            entries = await self._until_done("reading the readings stream", self._reader.read)
            if not entries:
                continue
            try:
                await self.handle(entries)
            except Exception:  # noqa: BLE001 - a bug must not stop persisting the rest
                # The entries stay pending: claimed again once idle, and dead-lettered if
                # they keep failing.
                logger.exception("worker: a round of {} entries failed", len(entries))
                await asyncio.sleep(1.0)

    async def _until_done(self, what: str, step: Callable[[], Awaitable[Any]]) -> Any:
        """Redis steps: retried with backoff until they work (the stream is the truth)."""
        delay = 0.05
        failing = False
        while True:
            try:
                result = await step()
            except REDIS_ERRORS as e:
                if not failing:
                    logger.warning("worker: Redis failed while {}, retrying: {}", what, e)
                failing = True
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._retry_max)
                continue
            if failing:
                logger.info("worker: Redis is back ({})", what)
            return result

    # ------------------------------------------------------------------ one round

    async def handle(self, entries: list[Delivery]) -> None:
        """Store a round of entries; an entry is acknowledged once each of its batches is
        stored or dead-lettered."""
        rows: list[Row] = []
        # Entries with no batch left to store: dead-lettered and acknowledged now.
        buried: list[Delivery] = []
        dead_now: list[_Dead] = []
        # Entries with batches to store: their dead batches wait for the commit.
        held: dict[bytes, list[_Dead]] = {}
        reasons = await self._recorded_reasons(entries)
        for entry in entries:
            dead, stored = self._sort(entry, reasons)
            if stored:
                rows += stored
                held[entry.entry_id] = dead
            else:
                buried.append(entry)
                dead_now += dead
        if buried:
            await self._until_done(
                "moving entries to the dead-letter stream",
                lambda: self._settle(dead_now, buried, {}),
            )
        if rows:
            await self._persist(rows, {e.entry_id: e for e in entries}, held)

    def _sort(self, entry: Delivery, reasons: dict[bytes, str]) -> tuple[list[_Dead], list[Row]]:
        """The entry's batches that are dead letters, and those to store."""
        if entry.deliveries > self._dead_letter_after:
            # Tried that often already (a refused batch is buried at its last try): it keeps
            # its consumers from acknowledging it, perhaps by crashing them. Not decoded
            # further than into its batches.
            redelivered = f"delivered {entry.deliveries} times without being acknowledged"
            try:
                batches = decode_entries(entry.fields)
            except EntryError:
                return [_whole(entry, "redelivered", redelivered)], []
            dead = []
            for index, batch in enumerate(batches):
                reason = reasons.get(_error_key(entry, index))
                kind = "redelivered" if reason is None else "rejected"
                dead.append(_dead_batch(entry, index, batch, kind, reason or redelivered))
            return dead, []
        try:
            decoded = decode_rows(entry.entry_id, entry.fields)
        except UndecodableError as e:
            return [_whole(entry, "undecodable", str(e))], []
        rows = [item for item in decoded if isinstance(item, Row)]
        dead = [
            _dead_batch(entry, item.index, item.batch, "undecodable", item.reason)
            for item in decoded
            if isinstance(item, UndecodableBatch)
        ]
        return dead, rows

    async def _recorded_reasons(self, entries: list[Delivery]) -> dict[bytes, str]:
        """Why Postgres refused batches of these entries at an earlier delivery."""
        keys = [key for e in entries if e.deliveries > 1 for key in _error_keys(e)]
        if not keys:
            return {}

        async def read() -> dict[bytes, str]:
            values = await self._redis.hmget(self._errors, keys)
            return {
                key: value.decode(errors="replace") if isinstance(value, bytes) else value
                for key, value in zip(keys, values, strict=True)
                if value is not None
            }

        result: dict[bytes, str] = await self._until_done("reading failure reasons", read)
        return result

    async def _persist(
        self, rows: list[Row], entries: dict[bytes, Delivery], held: dict[bytes, list[_Dead]]
    ) -> None:
        """Commit ``rows``; a group holding sampled batches is a span of their traces."""
        traces = [row.trace.decode() for row in rows if row.trace] if self._tracing.enabled else []
        if not traces:
            await self._commit(rows, entries, held)
            return
        # A child of the first sampled batch's write (so the trace runs on across the
        # stream into Postgres), linked to the others the same commit stored.
        with self._tracing.tracer.start_as_current_span(
            "persist readings",
            context=remote_context(traces[0]),
            kind=SpanKind.CONSUMER,
            links=links_from(traces[1:]),
            attributes={
                "messaging.system": "redis",
                "messaging.operation": "process",
                "messaging.destination.name": "readings",
                "messaging.batch.message_count": len(rows),
                "db.system": "postgresql",
            },
        ):
            await self._commit(rows, entries, held)

    async def _commit(
        self, rows: list[Row], entries: dict[bytes, Delivery], held: dict[bytes, list[_Dead]]
    ) -> None:
        """Store ``rows``, then settle the entries they came from (``held``: each one's dead
        batches): those with every batch stored or dead are acknowledged."""
        delay = 0.05
        failing_since: float | None = None
        while True:
            started = time.perf_counter()
            try:
                try:
                    inserted, samples, evaluation = await self._write(rows)
                    rejected: list[tuple[Row, str]] = []
                except (psycopg.DataError, psycopg.IntegrityError) as e:
                    logger.warning("worker: Postgres refused a group ({}); isolating", e)
                    rejected = await self._find_rejected(rows)
                    bad = {(row.entry_id, row.index) for row, _ in rejected}
                    rows = [row for row in rows if (row.entry_id, row.index) not in bad]
                    inserted, samples, evaluation = (
                        await self._write(rows) if rows else (0, 0, Evaluation())
                    )
            except Exception as e:
                if not _transient(e):
                    raise
                self.db_ok = False
                self._record(503, started, 0, 0)
                if failing_since is None:
                    failing_since = time.monotonic()
                    logger.warning(
                        "worker: cannot store {} readings, Postgres unavailable; retrying: {}",
                        len(rows),
                        f"{type(e).__name__}: {e}".strip(),
                    )
                if self._stopping.is_set():
                    return  # left pending: another worker (or the next start) stores them
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._retry_max)
                continue
            break
        if failing_since is not None:
            logger.info("worker: Postgres is back after {:.1f} s", time.monotonic() - failing_since)
        self.db_ok = True
        self.last_commit = time.time()
        self.groups += 1
        self.rows += inserted
        self.samples += samples
        self.duplicates += len(rows) - inserted
        self._record(422 if rejected else 200, started, inserted, samples)
        for change in evaluation.changes:
            self._on_alert(change)
        if evaluation.late and self._on_late is not None:
            self._on_late(evaluation.late)
        refused = self._refused(rejected, entries, held)
        settled = [entries[entry_id] for entry_id in held if entry_id not in refused]
        dead = [d for entry in settled for d in held[entry.entry_id]]
        await self._until_done(
            "acknowledging stored entries", lambda: self._settle(dead, settled, refused)
        )
        if rows and self._on_persisted is not None:
            await self._on_persisted(rows)

    def _refused(
        self,
        rejected: list[tuple[Row, str]],
        entries: dict[bytes, Delivery],
        held: dict[bytes, list[_Dead]],
    ) -> dict[bytes, dict[bytes, str]]:
        """The batches Postgres refused: at their entry's last try, dead batches of it (in
        ``held``); before, the entries left pending, each with the reasons to record."""
        self.rejected += len(rejected)
        refused: dict[bytes, dict[bytes, str]] = {}
        for row, reason in rejected:
            entry = entries[row.entry_id]
            logger.bind(entryId=row.entry_id.decode(), deviceId=row.device_id).warning(
                "worker: Postgres refused batch {} of readings entry {} (delivery {}): {}",
                row.index,
                row.entry_id.decode(),
                entry.deliveries,
                reason,
            )
            if entry.deliveries >= self._dead_letter_after:
                batch = decode_entries(entry.fields)[row.index]
                held[row.entry_id].append(_dead_batch(entry, row.index, batch, "rejected", reason))
            else:
                refused.setdefault(row.entry_id, {})[_error_key(entry, row.index)] = reason
        return refused

    def _record(self, status: int, started: float, rows: int, samples: int) -> None:
        duration = int((time.perf_counter() - started) * 1e6)
        self._telemetry.record(persist_record(status, duration, rows, samples))

    async def _write(self, rows: list[Row]) -> tuple[int, int, Evaluation]:
        # Results in binary: the inserted rows come back to be evaluated, and parse faster so.
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(binary=True) as cur,
        ):
            async with cur.copy(_COPY) as copy:
                await copy.write(b"".join(row.line for row in rows))
            await cur.execute(_INSERT)
            # Only what this commit stores is evaluated: a redelivered row is not again.
            inserted = await cur.fetchall()
            await update_device_status(cur)
            evaluation = await self._alerts.evaluate(cur, inserted)
        return len(inserted), sum(row[5] for row in inserted), evaluation

    async def _find_rejected(self, rows: list[Row]) -> list[tuple[Row, str]]:
        """Each row tried alone, in a savepoint of a transaction that is rolled back."""
        rejected: list[tuple[Row, str]] = []
        async with (
            self._pool.connection() as conn,
            conn.transaction(force_rollback=True),
            conn.cursor() as cur,
        ):
            for row in rows:
                try:
                    async with conn.transaction():
                        await self._try_row(cur, row)
                except (psycopg.DataError, psycopg.IntegrityError) as e:
                    reason = f"{type(e).__name__}: {str(e).strip()}"
                    rejected.append((row, reason[:500]))
        return rejected

    @staticmethod
    async def _try_row(cur: psycopg.AsyncCursor[TupleRow], row: Row) -> None:
        await cur.execute("DELETE FROM readings_staging")
        async with cur.copy(_COPY) as copy:
            await copy.write(row.line)
        await cur.execute(_INSERT)

    async def _settle(
        self,
        dead: list[_Dead],
        acknowledged: list[Delivery],
        refused: dict[bytes, dict[bytes, str]],
    ) -> None:
        """One step: the dead letters added, the entries they belong to (every batch of
        which is now stored or dead) acknowledged, atomically; the reasons of the batches
        refused before their last try recorded (their entries stay pending)."""
        now_ms = time.time_ns() // 1_000_000
        # Reasons are recorded only at a delivery before the last: none for a first one.
        forget = [key for e in acknowledged if e.deliveries > 1 for key in _error_keys(e)]
        reasons = {key: reason for batch in refused.values() for key, reason in batch.items()}
        async with self._redis.pipeline(transaction=bool(dead)) as pipe:
            for letter in dead:
                # redis-py's field type is a dict of every encodable type (invariant).
                fields: dict[Any, Any] = encode_dead_letter(
                    letter.entry.entry_id,
                    letter.fields,
                    kind=letter.kind,
                    reason=letter.reason,
                    deliveries=letter.entry.deliveries,
                    consumer=self._consumer,
                    at_ms=now_ms,
                    index=letter.index,
                )
                pipe.xadd(self._dead, fields, maxlen=self._dead_letter_maxlen, approximate=True)
            if acknowledged:
                pipe.xack(self._stream, PERSIST_GROUP, *[e.entry_id for e in acknowledged])
            if forget:
                pipe.hdel(self._errors, *forget)
            if reasons:
                # redis-py's mapping type is invariant as well.
                mapping: dict[Any, Any] = reasons
                pipe.hset(self._errors, mapping=mapping)
                pipe.expire(self._errors, 7 * 86_400)
            await pipe.execute()
        for letter in dead:
            self.dead_letters += 1
            self._telemetry.record(dead_letter_record(letter.kind))
            entry_id = letter.entry.entry_id.decode()
            what = "entry" if letter.index is None else f"batch {letter.index} of entry"
            logger.bind(entryId=entry_id).error(
                "worker: readings {} {} moved to the dead-letter stream ({}): {}",
                what,
                entry_id,
                letter.kind,
                letter.reason,
            )


class StreamJanitor:
    """Trims the streams below what every group acknowledged; measures the backlogs."""

    def __init__(
        self,
        redis: RedisClient,
        streams: list[str] | Callable[[], list[str]],
        *,
        interval: float,
        on_measure: Callable[[dict[str, dict[str, int]]], None],
    ) -> None:
        self._redis = redis
        self._streams = streams
        self._interval = interval
        self._on_measure = on_measure
        self.trimmed = 0

    async def run_once(self) -> dict[str, dict[str, int]]:
        measured: dict[str, dict[str, int]] = {}
        streams = self._streams() if callable(self._streams) else self._streams
        for stream in streams:
            if not await self._redis.exists(stream):
                measured[stream] = {"length": 0}
                continue
            first = await safe_trim_id(self._redis, stream)
            if first is not None:
                self.trimmed += int(await self._redis.xtrim(stream, minid=first, approximate=False))
            groups: dict[str, int] = {}
            length = int(await self._redis.xlen(stream))
            for group in await self._redis.xinfo_groups(stream) if length else []:
                lag = group.get("lag")
                name = bytes(group["name"]).decode()
                groups[f"{name}.lag"] = length if lag is None else int(lag)
                groups[f"{name}.pending"] = int(group.get("pending", 0))
            groups["length"] = length
            measured[stream] = groups
        return measured

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(max(self._interval * 4, 5.0)):
                    self._on_measure(await self.run_once())
            except REDIS_ERRORS as e:
                logger.debug("stream janitor skipped a round: {}", e)
            await asyncio.sleep(self._interval)
