"""Readings entries that carry several batches, beside entries in the one-batch format.

The worker app (its real factory) against the real Redis and Postgres. An entry is what one
write of the service adds (``shared.readings.encode_write``: ``d0``, ``d1``, ... beside one
``r``); entries in the one-batch format (``d``, ``r``) are those an older service left in
the stream. Every batch is stored once, and dead letters are per batch: an undecodable or
refused batch goes alone, with its index in its entry, and the entry's other batches are
stored.
"""

from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from shared.keys import Keys
from shared.readings import (
    PERSIST_GROUP,
    DeadLetter,
    ReadingsEntry,
    decode_dead_letter,
    decode_entries,
    decode_entry,
    encode_entry,
    encode_write,
)
from shared.settings import ServiceSettings
from tests.support.env import AiohttpClient
from tests.support.worker import (
    WRITE_MAX_BATCH,
    add_bodies,
    add_readings,
    eventually,
    reading,
    stored_counts,
)
from tests.support.worker import worker_settings as tuned
from worker.app import create_app
from worker.appkeys import WORKER
from worker.persist import Row, UndecodableBatch, UndecodableError, decode_rows

Client = TestClient[web.Request, web.Application]
StartWorker = Callable[..., Awaitable[Client]]
Entries = list[tuple[bytes, dict[bytes, bytes]]]

TRACE_A = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_B = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# A consumer whose pod has no heartbeat: a worker that read entries and was killed.
GONE = "gone:0123abcd"


@pytest.fixture
def start_worker(aiohttp_client: AiohttpClient, settings: ServiceSettings) -> StartWorker:
    async def start(**overrides: Any) -> Client:
        return await aiohttp_client(create_app(tuned(settings, **overrides)))

    return start


def body(device: str, seq: int, **values: Any) -> bytes:
    return msgspec.json.encode(reading(device, seq, **values))


async def persisted(redis: Redis, keys: Keys) -> bool:
    """The persist group has read and acknowledged every entry."""
    for group in await redis.xinfo_groups(keys.readings):
        if group["name"] == PERSIST_GROUP.encode():
            return bool(group["pending"] == 0 and group["lag"] == 0)
    return False


async def dead_letters(redis: Redis, keys: Keys) -> list[DeadLetter]:
    entries = cast(Entries, await redis.xrange(keys.readings_dead))
    return [decode_dead_letter(fields) for _, fields in entries]


async def received_ms(redis: Redis, keys: Keys, entry_id: bytes) -> int:
    entries = cast(Entries, await redis.xrange(keys.readings, min=entry_id, max=entry_id))
    return decode_entries(entries[0][1])[0].received_ms


async def dead_letter_count_is(redis: Redis, keys: Keys, count: int) -> bool:
    return int(await redis.xlen(keys.readings_dead)) == count


def test_an_entry_decodes_to_a_row_per_batch_each_with_its_index_and_trace() -> None:
    fields = encode_write(
        1_764_000_000_000,
        [(body("dev", 1), TRACE_A), (b"{not json", TRACE_B), (body("dev", 2), None)],
    )

    decoded = decode_rows(b"5-0", fields)
    old = decode_rows(b"6-0", encode_entry(body("dev", 3), 1_764_000_000_000, TRACE_B))

    assert [(type(item), item.entry_id, item.index) for item in decoded] == [
        (Row, b"5-0", 0),
        (UndecodableBatch, b"5-0", 1),
        (Row, b"5-0", 2),
    ]
    first, bad, last = decoded
    assert isinstance(first, Row)
    assert isinstance(bad, UndecodableBatch)
    assert isinstance(last, Row)
    assert (first.device_id, first.ts_ms, first.samples, first.trace) == (
        "dev",
        reading("dev", 1)["ts"],
        4,
        TRACE_A,
    )
    assert last.trace is None
    assert bad.batch == ReadingsEntry(b"{not json", b"1764000000000", TRACE_B)
    assert "not a valid batch" in bad.reason
    assert [(type(item), item.index) for item in old] == [(Row, 0)]
    assert isinstance(old[0], Row)
    assert old[0].trace == TRACE_B


@pytest.mark.parametrize(
    "fields",
    [
        {b"d0": b"{}"},  # no receive time
        {b"r": b"1764000000000"},  # no batch
        {b"r": b"soon", b"d0": b"{}"},
    ],
)
def test_fields_that_are_no_entry_do_not_decode_at_all(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(UndecodableError):
        decode_rows(b"5-0", fields)


async def test_a_stream_of_one_batch_and_multi_batch_entries_is_stored_exactly_once(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    devices = [f"mix-{i}-" + keys.prefix.split(":")[1] for i in range(3)]
    batches = [reading(d, seq) for seq in range(30) for d in devices]
    # Entries an older service left, then its successor's writes of up to WRITE_MAX_BATCH
    # batches, then one more old entry: a retry both stored (its idempotency window passed).
    old = await add_readings(redis, keys, batches[:10], one_batch_format=True)
    new = await add_readings(redis, keys, batches[10:])
    again = await add_readings(redis, keys, [batches[42]], one_batch_format=True)

    worker = await start_worker()
    await eventually(lambda: persisted(redis, keys))

    counts = await stored_counts(settings.database_url, devices)
    persister = worker.app[WORKER].persister
    assert (len(old), len(new), len(again)) == (10, -(-80 // WRITE_MAX_BATCH), 1)
    assert counts == {(d, seq): 1 for seq in range(30) for d in devices}
    assert (persister.rows, persister.duplicates, persister.dead_letters) == (90, 1, 0)
    assert await dead_letters(redis, keys) == []


async def test_an_undecodable_batch_is_dead_lettered_alone_with_its_index(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = "dev-bad-" + keys.prefix.split(":")[1]
    bodies = [body(device, 0), b"{not json", body(device, 2), body(device, 3)]
    traces = [None, TRACE_A, TRACE_B, None]
    (mixed,) = await add_bodies(redis, keys, bodies, traceparents=traces)
    mixed_received_ms = await received_ms(redis, keys, mixed)  # the worker trims it once done
    await add_readings(redis, keys, [reading(device, seq) for seq in range(4, 8)])

    worker = await start_worker()
    await eventually(lambda: persisted(redis, keys))

    dead = await dead_letters(redis, keys)
    counts = await stored_counts(settings.database_url, [device])
    assert len(dead) == 1
    assert "not a valid batch" in dead[0].reason
    assert dead[0] == DeadLetter(
        entry_id=mixed,
        kind="undecodable",
        reason=dead[0].reason,
        deliveries=1,
        consumer=dead[0].consumer,
        at_ms=dead[0].at_ms,
        fields=encode_entry(b"{not json", mixed_received_ms, TRACE_A),
        index=1,
    )
    assert decode_entry(dead[0].fields).batch == b"{not json"
    assert counts == {(device, seq): 1 for seq in (0, 2, 3, 4, 5, 6, 7)}
    assert worker.app[WORKER].persister.dead_letters == 1
    assert await redis.hlen(keys.readings_errors) == 0


async def test_a_batch_postgres_refuses_is_dead_lettered_at_the_last_try_the_rest_stored_once(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = "dev-refused-" + keys.prefix.split(":")[1]
    # Valid JSON the service would have refused: Postgres cannot hold 1e999 in a double.
    refused = body(device, 2).replace(b"0.65", b"1e999")
    bodies = [body(device, 0), body(device, 1), refused, body(device, 3), body(device, 4)]
    (entry_id,) = await add_bodies(
        redis, keys, bodies, traceparents=[None, None, TRACE_A, None, None]
    )
    entry_received_ms = await received_ms(redis, keys, entry_id)  # the worker trims it once done

    worker = await start_worker(worker_dead_letter_after=3, worker_claim_idle=0.5)
    # Left pending meanwhile, the reason recorded under the batch's own key.
    await eventually(lambda: redis.hexists(keys.readings_errors, b"%s/2" % entry_id))
    await eventually(lambda: dead_letter_count_is(redis, keys, 1), within=15)
    await eventually(lambda: persisted(redis, keys))

    (letter,) = await dead_letters(redis, keys)
    counts = await stored_counts(settings.database_url, [device])
    persister = worker.app[WORKER].persister
    assert (letter.entry_id, letter.index, letter.kind, letter.deliveries) == (
        entry_id,
        2,
        "rejected",
        3,
    )
    assert "out of range" in letter.reason
    assert letter.fields == encode_entry(refused, entry_received_ms, TRACE_A)
    assert counts == {(device, seq): 1 for seq in (0, 1, 3, 4)}
    # Refused at each of its three deliveries; the others stored at the first, then
    # delivered twice more with it.
    assert (persister.rejected, persister.rows, persister.duplicates) == (3, 4, 8)
    assert persister.dead_letters == 1
    assert await redis.hlen(keys.readings_errors) == 0


async def test_an_entry_delivered_too_often_has_each_batch_dead_lettered_as_recorded(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    """Entries a consumer kept failing on: each batch a dead letter, refused if Postgres
    refused it at an earlier delivery (its reason recorded), else redelivered."""
    device = "dev-often-" + keys.prefix.split(":")[1]
    (multi,) = await add_bodies(redis, keys, [body(device, seq) for seq in range(3)])
    (old,) = await add_bodies(redis, keys, [body(device, 3)], one_batch_format=True)
    old_received_ms = await received_ms(redis, keys, old)  # the worker trims it once done
    whole = cast(bytes, await redis.xadd(keys.readings, {b"x": b"y"}))  # no entry at all
    await redis.xgroup_create(keys.readings, PERSIST_GROUP, id="0")
    await redis.xreadgroup(PERSIST_GROUP, GONE, {keys.readings: ">"})
    ids = [multi, old, whole]
    await redis.xclaim(
        keys.readings, PERSIST_GROUP, GONE, min_idle_time=0, message_ids=ids, retrycount=5
    )
    await redis.hset(
        keys.readings_errors,
        mapping={b"%s/1" % multi: "DataError: refused", old: "DataError: refused too"},
    )

    await start_worker(worker_dead_letter_after=2, worker_claim_idle=0.2)
    await eventually(lambda: dead_letter_count_is(redis, keys, 5))
    await eventually(lambda: persisted(redis, keys))

    dead = await dead_letters(redis, keys)
    redelivered = "delivered 6 times without being acknowledged"
    assert sorted((d.entry_id, d.index, d.kind, d.reason, d.deliveries) for d in dead) == sorted(
        [
            (multi, 0, "redelivered", redelivered, 6),
            (multi, 1, "rejected", "DataError: refused", 6),
            (multi, 2, "redelivered", redelivered, 6),
            (old, None, "rejected", "DataError: refused too", 6),
            (whole, None, "redelivered", redelivered, 6),
        ]
    )
    by_id = {(d.entry_id, d.index): d for d in dead}
    assert decode_entry(by_id[multi, 1].fields).batch == body(device, 1)
    assert by_id[old, None].fields == encode_entry(body(device, 3), old_received_ms)
    assert by_id[whole, None].fields == {b"x": b"y"}
    assert await stored_counts(settings.database_url, [device]) == {}
    assert await redis.hlen(keys.readings_errors) == 0


async def test_entries_redelivered_after_their_commit_store_nothing_twice(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    """A worker killed between its commit and its acknowledgement leaves its entries
    pending with a consumer that is gone, their batches already in ``readings``: that
    state, built by storing the entries once and adding them again as the gone consumer's
    pending entries."""
    devices = [f"again-{i}-" + keys.prefix.split(":")[1] for i in range(2)]
    batches = [reading(d, seq) for seq in range(25) for d in devices]
    await add_readings(redis, keys, batches[:6], one_batch_format=True)
    await add_readings(redis, keys, batches[6:])
    committed = cast(Entries, await redis.xrange(keys.readings))
    first = await start_worker()
    await eventually(lambda: persisted(redis, keys))
    await first.close()
    async with redis.pipeline(transaction=False) as pipe:
        for _, fields in committed:
            copied: dict[Any, Any] = fields
            pipe.xadd(keys.readings, copied)
        await pipe.execute()
    held = await redis.xreadgroup(PERSIST_GROUP, GONE, {keys.readings: ">"})

    second = await start_worker(worker_claim_idle=0.2)
    await eventually(lambda: persisted(redis, keys))

    persister = second.app[WORKER].persister
    counts = await stored_counts(settings.database_url, devices)
    assert len(held[0][1]) == len(committed) == 6 + -(-44 // WRITE_MAX_BATCH)
    assert counts == {(d, seq): 1 for seq in range(25) for d in devices}
    assert persister.claimed == len(committed)
    assert (persister.rows, persister.duplicates, persister.dead_letters) == (0, 50, 0)
    assert await dead_letters(redis, keys) == []
