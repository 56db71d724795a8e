"""The readings stream entry and its dead letter: written by the service's write or by
``encode_write`` (``encode_entry`` for one batch in the first format), read back by the
worker's decoder, with nothing lost or renamed between."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from service.fastpath.resp import RespConnection
from service.store import STORED, WRITE_CONNECTION_SETUP, ReadingsWriter
from shared.keys import Keys
from shared.readings import (
    BATCH_FIELD,
    BATCHES_FIELD,
    DEAD_LETTER_KINDS,
    RECEIVED_FIELD,
    TRACE_FIELD,
    DeadLetter,
    EntryError,
    ReadingsEntry,
    decode_dead_letter,
    decode_entries,
    decode_entry,
    encode_dead_letter,
    encode_entry,
    encode_write,
)
from shared.tasks import cancel_and_wait
from tests.support.env import REDIS_URL

Entries = list[tuple[bytes, dict[bytes, bytes]]]

BATCH = b'{"device_id":"dev-1","seq":7,"ts":1764000000000,"rate_hz":50,"ppg":[0.5,0.6],"hr":72.0}'
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
async def writer(keys: Keys, redis: Redis) -> AsyncIterator[ReadingsWriter]:
    """The service's writer (its real Lua script) on the test's key prefix; ``redis`` is
    set up first so that it cleans the keys up after the writer has stopped."""
    conn = RespConnection(REDIS_URL, connect_timeout=2, setup=WRITE_CONNECTION_SETUP)
    writer = ReadingsWriter(
        conn,
        keys,
        max_batch=16,
        max_pending=16,
        max_in_flight=1,
        timeout=5,
        idempotency_window=128,
        idempotency_ttl=60,
    )
    runner = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        await cancel_and_wait([runner])
        conn.close()


@given(
    batch=st.binary(),
    received_ms=st.integers(min_value=0, max_value=2**63 - 1),
    traceparent=st.none() | st.binary(min_size=1),
)
def test_an_encoded_entry_decodes_to_what_was_encoded(
    batch: bytes, received_ms: int, traceparent: bytes | None
) -> None:
    entry = decode_entry(encode_entry(batch, received_ms, traceparent))

    assert (entry.batch, entry.received_ms, entry.traceparent) == (
        batch,
        received_ms,
        traceparent,
    )


def test_an_empty_traceparent_is_not_written_as_the_script_leaves_it_out() -> None:
    fields = encode_entry(BATCH, 1_764_000_000_000, b"")

    assert list(fields) == [BATCH_FIELD, RECEIVED_FIELD]
    assert decode_entry(fields).traceparent is None


@pytest.mark.parametrize("trace", [b"", TRACEPARENT], ids=["not-sampled", "sampled"])
async def test_the_write_adds_the_entry_that_encode_write_describes(
    writer: ReadingsWriter, redis: Redis, keys: Keys, trace: bytes
) -> None:
    before = now_ms()
    outcome = await writer.submit("dev-1", 7, BATCH, trace)
    after = now_ms()
    assert outcome.stored == STORED

    [(_, fields)] = cast(Entries, await redis.xrange(keys.readings))
    [entry] = decode_entries(fields)

    assert entry.batch == BATCH
    assert before <= entry.received_ms <= after
    assert entry.traceparent == (trace or None)
    # The same fields in the same order: what the worker reads is what the encoder writes.
    expected = encode_write(entry.received_ms, [(BATCH, trace)])
    assert list(fields.items()) == list(expected.items())


async def test_a_write_of_several_batches_adds_one_entry_that_encode_write_describes(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    sent = [
        (b'{"seq":1}', TRACEPARENT),
        (b"", b""),
        (b"1:a,", b""),  # a netstring inside a batch is only bytes
        (BATCH, TRACEPARENT.replace(b"-01", b"-00")),
    ]
    # Queued before the flusher runs, so they leave in one write.
    futures = [writer.submit("dev-1", seq, batch, trace) for seq, (batch, trace) in enumerate(sent)]
    assert [r.stored for r in await asyncio.gather(*futures)] == [STORED] * len(sent)

    [(_, fields)] = cast(Entries, await redis.xrange(keys.readings))
    received_ms = int(fields[RECEIVED_FIELD])

    assert list(fields.items()) == list(encode_write(received_ms, sent).items())
    assert [(e.batch, e.traceparent) for e in decode_entries(fields)] == [
        (batch, trace or None) for batch, trace in sent
    ]


async def test_entries_written_by_the_encoders_and_the_writer_decode_alike(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    await writer.submit("dev-1", 1, BATCH, TRACEPARENT)
    [(_, by_writer)] = cast(Entries, await redis.xrange(keys.readings))
    received_ms = decode_entries(by_writer)[0].received_ms
    by_encoder: dict[Any, Any] = encode_write(received_ms, [(BATCH, TRACEPARENT)])
    one_batch: dict[Any, Any] = encode_entry(BATCH, received_ms, TRACEPARENT)  # redis-py's type
    await redis.xadd(keys.readings, by_encoder)
    await redis.xadd(keys.readings, one_batch)

    entries = cast(Entries, await redis.xrange(keys.readings))

    assert [decode_entries(fields) for _, fields in entries] == [
        [ReadingsEntry(BATCH, b"%d" % received_ms, TRACEPARENT)]
    ] * 3


@pytest.mark.parametrize(
    "fields",
    [
        {b"d": BATCH, b"r": b"1764000000000"},
        {b"d": BATCH, b"r": b"1764000000000", b"t": TRACEPARENT},
    ],
    ids=["not-sampled", "sampled"],
)
def test_an_entry_as_written_before_the_names_were_shared_still_decodes(
    fields: dict[bytes, bytes],
) -> None:
    entry = decode_entry(fields)

    assert (entry.batch, entry.received_ms, entry.traceparent) == (
        BATCH,
        1_764_000_000_000,
        fields.get(b"t"),
    )


def test_fields_a_newer_writer_adds_are_ignored() -> None:
    fields = {**encode_entry(BATCH, 5), b"zz": b"new"}

    assert decode_entry(fields) == ReadingsEntry(BATCH, b"5", None)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"r": b"1764000000000"}, "has no 'd' (batch) or 'r' (received at) field"),
        ({b"d": BATCH}, "has no 'd' (batch) or 'r' (received at) field"),
        ({b"d": BATCH, b"r": b"-5"}, "'r' is not epoch milliseconds: b'-5'"),
        ({b"d": BATCH, b"r": b""}, "'r' is not epoch milliseconds: b''"),
        ({b"d": BATCH, b"r": b"17.5"}, "'r' is not epoch milliseconds: b'17.5'"),
    ],
    ids=["no-batch", "no-time", "negative-time", "empty-time", "fractional-time"],
)
def test_fields_that_are_no_entry_are_refused_with_the_reason(
    fields: dict[bytes, bytes], reason: str
) -> None:
    with pytest.raises(EntryError) as refused:
        decode_entry(fields)

    assert reason in str(refused.value)


def test_the_field_names_fit_in_the_scripts_quoted_strings() -> None:
    for name in (BATCH_FIELD, BATCHES_FIELD, RECEIVED_FIELD, TRACE_FIELD):
        assert name.isascii(), name
        assert name.isalpha(), name


@pytest.mark.parametrize("kind", DEAD_LETTER_KINDS)
async def test_a_dead_letter_round_trips_through_the_stream_with_its_original_fields(
    redis: Redis, keys: Keys, kind: str
) -> None:
    original = encode_entry(b"{not json", 1_764_000_000_000, TRACEPARENT)
    fields: dict[Any, Any] = encode_dead_letter(
        b"1764000000000-3",
        original,
        kind=kind,
        reason="not a valid batch: ü",
        deliveries=2,
        consumer="pod-a:0123abcd",
        at_ms=1_764_000_000_500,
    )
    await redis.xadd(keys.readings_dead, fields)

    [(_, stored)] = cast(Entries, await redis.xrange(keys.readings_dead))

    assert decode_dead_letter(stored) == DeadLetter(
        entry_id=b"1764000000000-3",
        kind=kind,
        reason="not a valid batch: ü",
        deliveries=2,
        consumer="pod-a:0123abcd",
        at_ms=1_764_000_000_500,
        fields=original,
    )
    assert decode_entry(decode_dead_letter(stored).fields) == decode_entry(original)


def test_a_dead_letter_keeps_the_names_it_was_written_with() -> None:
    fields = {
        b"d": b"{not json",
        b"r": b"1764000000000",
        b"dl_id": b"1-0",
        b"dl_kind": b"undecodable",
        b"dl_reason": b"not a valid batch",
        b"dl_deliveries": b"1",
        b"dl_consumer": b"pod-a:0123abcd",
        b"dl_at": b"1764000000500",
    }

    assert decode_dead_letter(fields) == DeadLetter(
        entry_id=b"1-0",
        kind="undecodable",
        reason="not a valid batch",
        deliveries=1,
        consumer="pod-a:0123abcd",
        at_ms=1_764_000_000_500,
        fields={b"d": b"{not json", b"r": b"1764000000000"},
    )
    assert (
        encode_dead_letter(
            b"1-0",
            {b"d": b"{not json", b"r": b"1764000000000"},
            kind="undecodable",
            reason="not a valid batch",
            deliveries=1,
            consumer="pod-a:0123abcd",
            at_ms=1_764_000_000_500,
        )
        == fields
    )


@given(
    received_ms=st.integers(min_value=0, max_value=2**63 - 1),
    batches=st.lists(
        st.tuples(st.binary(), st.none() | st.binary(min_size=1)), min_size=1, max_size=20
    ),
)
def test_a_written_entry_decodes_to_each_of_its_batches_in_order(
    received_ms: int, batches: list[tuple[bytes, bytes | None]]
) -> None:
    entries = decode_entries(encode_write(received_ms, batches))

    assert [(e.batch, e.received_ms, e.traceparent) for e in entries] == [
        (batch, received_ms, traceparent) for batch, traceparent in batches
    ]


def test_a_dead_letter_of_one_batch_of_several_names_its_index() -> None:
    batch = encode_entry(BATCH, 1_764_000_000_000, TRACEPARENT)
    fields = encode_dead_letter(
        b"1-0",
        batch,
        kind="rejected",
        reason="DataError: out of range",
        deliveries=5,
        consumer="pod-a:0123abcd",
        at_ms=1_764_000_000_500,
        index=3,
    )

    assert fields[b"dl_index"] == b"3"
    assert decode_dead_letter(fields).index == 3
    assert decode_dead_letter(fields).fields == batch
    assert decode_dead_letter({k: v for k, v in fields.items() if k != b"dl_index"}).index is None


def test_a_readings_entry_is_no_dead_letter() -> None:
    with pytest.raises(EntryError, match="not a dead letter"):
        decode_dead_letter(encode_entry(BATCH, 5))
