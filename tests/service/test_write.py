"""The service's write to Redis (``service/store.py``), against the real Redis.

One write is one transaction: ``MULTI``, the ``XADD`` of one entry carrying every batch,
the script deciding each batch (rate limit, then idempotency on (device, seq)), ``EXEC``.
These tests drive the real ``ReadingsWriter`` on the write's own connection and check what
it answers against what the readings stream and the devices' state hold afterwards.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol, cast

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from service.fastpath.resp import RespConnection
from service.ratelimit import (
    ALLOWED,
    REFUSED,
    SHADOWED,
    Decision,
    LocalLimiter,
    Policy,
    Window,
    decision_from_reply,
)
from service.store import (
    DUPLICATE,
    NO_POLICY,
    NOT_ATTEMPTED,
    STORED,
    WRITE_CONNECTION_SETUP,
    ReadingsWriter,
    StoreUnavailableError,
    WriteResult,
)
from shared.keys import Keys
from shared.readings import (
    ReadingsEntry,
    decode_entries,
    encode_entry,
    encode_write,
)
from shared.settings import ServiceSettings, load_settings
from shared.tasks import cancel_and_wait
from tests.support.env import REDIS_URL
from tests.support.readings import StreamEntries, batches_of

# The idempotency window of most tests: a multiple of 8, so the ring is exactly this long.
WINDOW = 16
TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def payload(device: str, seq: int) -> bytes:
    return b'{"device_id":"%s","seq":%d}' % (device.encode(), seq)


class OpenWriter(Protocol):
    def __call__(
        self,
        *,
        window: int = WINDOW,
        ttl: int = 3600,
        policy: Policy | None = None,
        max_batch: int = 64,
    ) -> ReadingsWriter: ...


@pytest.fixture
async def open_writer(redis: Redis, keys: Keys) -> AsyncIterator[OpenWriter]:
    """Starts writers on the test's keys, each on its own write connection (the script
    loaded when it connects, as the service's); all stopped before ``redis`` cleans up."""
    started: list[tuple[asyncio.Task[None], RespConnection]] = []

    def open_writer(
        *,
        window: int = WINDOW,
        ttl: int = 3600,
        policy: Policy | None = None,
        max_batch: int = 64,
    ) -> ReadingsWriter:
        connection = RespConnection(REDIS_URL, connect_timeout=5, setup=WRITE_CONNECTION_SETUP)
        writer = ReadingsWriter(
            connection,
            keys,
            max_batch=max_batch,
            max_pending=2 * max_batch,
            max_in_flight=1,
            timeout=5,
            idempotency_window=window,
            idempotency_ttl=ttl,
            policy=policy,
        )
        started.append((asyncio.create_task(writer.run()), connection))
        return writer

    yield open_writer
    for runner, connection in started:
        await cancel_and_wait([runner])
        connection.close()


@pytest.fixture
async def writer(open_writer: OpenWriter) -> ReadingsWriter:
    return open_writer()


async def write(
    writer: ReadingsWriter, batches: Iterable[tuple[str, int]], traces: Sequence[bytes] = ()
) -> list[WriteResult]:
    """These (device, seq) batches in ONE write (queued before the flusher runs), each with
    ``payload(device, seq)`` and its trace (none by default); what Redis decided."""
    batches = list(batches)
    traces = list(traces) or [b""] * len(batches)
    writes = writer.batches
    futures = [
        writer.submit(device, seq, payload(device, seq), trace)
        for (device, seq), trace in zip(batches, traces, strict=True)
    ]
    results = await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
    assert writer.batches == writes + 1, "not one write"
    return results


async def each_alone(writer: ReadingsWriter, batches: Iterable[tuple[str, int]]) -> list[int]:
    """Each batch in a write of its own, in turn; what became of each (``stored``)."""
    return [(await write(writer, [batch]))[0].stored for batch in batches]


def stored(results: Iterable[WriteResult]) -> list[int]:
    return [r.stored for r in results]


async def entries(redis: Redis, keys: Keys) -> StreamEntries:
    return cast(StreamEntries, await redis.xrange(keys.readings))


async def in_stream(redis: Redis, keys: Keys) -> list[tuple[str, int]]:
    """The (device, seq) of every batch in the readings stream, in order."""
    batches = [msgspec.json.decode(b.batch) for b in batches_of(await entries(redis, keys))]
    return [(batch["device_id"], batch["seq"]) for batch in batches]


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def state_hashes(redis: Redis, keys: Keys) -> dict[int, dict[bytes, bytes]]:
    """Every state hash of the test's keys, by generation number."""
    found = [key async for key in redis.scan_iter(match=f"{keys.ingest_state_prefix}*")]
    return {
        int(key.decode().removeprefix(keys.ingest_state_prefix)): cast(
            dict[bytes, bytes], await redis.hgetall(key)
        )
        for key in found
    }


# Idempotency: a seq in [low, top] is seen unless the ring marks it missing; above top it is
# new (the seqs skipped become missing); below low or older than the window, unknown: stored.


async def test_seqs_in_order_are_all_stored(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    seqs = list(range(1, 41))
    results = [*await write(writer, [("a", s) for s in seqs[:3]])]
    results += await write(writer, [("a", s) for s in seqs[3:30]])
    results += await write(writer, [("a", s) for s in seqs[30:]])

    assert stored(results) == [STORED] * len(seqs)
    assert await in_stream(redis, keys) == [("a", s) for s in seqs]
    assert (writer.stored, writer.duplicates) == (len(seqs), 0)


async def test_a_retry_of_the_last_seq_or_of_one_within_the_window_is_a_duplicate(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    await write(writer, [("a", s) for s in range(1, 21)])

    # The window is the WINDOW seqs up to the highest stored: 5..20.
    retries = await each_alone(writer, [("a", 20), ("a", 5), ("a", 12)])
    together = await write(writer, [("a", 20), ("a", 5), ("a", 19)])

    assert retries == [DUPLICATE] * 3
    assert stored(together) == [DUPLICATE] * 3
    assert await in_stream(redis, keys) == [("a", s) for s in range(1, 21)]
    assert writer.duplicates == 6


@pytest.mark.parametrize("grouping", ["one write per batch", "one write"])
async def test_seqs_out_of_order_are_each_stored_once(
    writer: ReadingsWriter, redis: Redis, keys: Keys, grouping: str
) -> None:
    sent = [("a", s) for s in (1, 2, 5, 3, 4, 3, 5, 4)]

    if grouping == "one write":
        outcome = stored(await write(writer, sent))
    else:
        outcome = await each_alone(writer, sent)

    # 5 leaves 3 and 4 missing: each is stored when it comes, then seen.
    assert outcome == [STORED] * 5 + [DUPLICATE] * 3
    assert await in_stream(redis, keys) == [("a", s) for s in (1, 2, 5, 3, 4)]


async def test_a_seq_below_the_first_one_seen_is_unknown_so_stored_each_time(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    outcome = await each_alone(writer, [("a", 5), ("a", 3), ("a", 4), ("a", 3), ("a", 5)])

    # Nothing is known below the first seq (low): stored again, the worker dedupes.
    assert outcome == [STORED, STORED, STORED, STORED, DUPLICATE]
    assert await in_stream(redis, keys) == [("a", s) for s in (5, 3, 4, 3)]


@pytest.mark.parametrize("window", [10, 16])
async def test_a_seq_older_than_the_window_is_stored_again(
    open_writer: OpenWriter, redis: Redis, keys: Keys, window: int
) -> None:
    """The window is IDEMPOTENCY_WINDOW rounded up to whole bytes: 10 remembers 16 seqs."""
    writer = open_writer(window=window)
    await write(writer, [("a", s) for s in range(1, 21)])

    outcome = await each_alone(writer, [("a", 5), ("a", 4), ("a", 4), ("a", 1)])

    assert outcome == [DUPLICATE, STORED, STORED, STORED]
    assert await in_stream(redis, keys) == [
        *(("a", s) for s in range(1, 21)),
        ("a", 4),
        ("a", 4),
        ("a", 1),
    ]


async def test_a_jump_of_a_window_or_more_starts_afresh(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    await write(writer, [("a", s) for s in range(1, 6)])

    jump = await each_alone(writer, [("a", 5 + WINDOW)])
    older = await each_alone(writer, [("a", 4 + WINDOW), ("a", 4 + WINDOW), ("a", 3), ("a", 5)])
    again = await each_alone(writer, [("a", 5 + WINDOW)])

    assert jump == [STORED]
    # What came before the jump is unknown now, however recent.
    assert older == [STORED] * 4
    assert again == [DUPLICATE]
    assert await in_stream(redis, keys) == [
        *(("a", s) for s in range(1, 6)),
        ("a", 5 + WINDOW),
        ("a", 4 + WINDOW),
        ("a", 4 + WINDOW),
        ("a", 3),
        ("a", 5),
    ]


async def test_a_jump_within_the_window_leaves_the_seqs_skipped_missing(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    await write(writer, [("a", s) for s in range(1, 6)])
    top = 5 + WINDOW - 1

    outcome = await each_alone(writer, [("a", top), ("a", 10), ("a", 10), ("a", 5), ("a", 6)])

    # 6..top-1 were skipped: stored when they come; 5 is still within the window, and seen.
    assert outcome == [STORED, STORED, DUPLICATE, DUPLICATE, STORED]
    assert await in_stream(redis, keys) == [
        *(("a", s) for s in range(1, 6)),
        ("a", top),
        ("a", 10),
        ("a", 6),
    ]


async def test_the_same_seq_twice_in_one_write_is_stored_once(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    results = await write(
        writer, [("a", 1), ("a", 2), ("a", 2), ("a", 3)], traces=[b"", TRACE, b"", b""]
    )

    assert stored(results) == [STORED, STORED, DUPLICATE, STORED]
    [(_, fields)] = await entries(redis, keys)
    [first, second, third] = decode_entries(fields)
    assert [first.batch, second.batch, third.batch] == [payload("a", s) for s in (1, 2, 3)]
    assert second.traceparent == TRACE  # the first copy's


@pytest.mark.parametrize(("before", "after"), [(16, 32), (32, 16), (16, 8)])
async def test_a_window_change_forgets_the_ring_but_loses_no_batch(
    open_writer: OpenWriter, redis: Redis, keys: Keys, before: int, after: int
) -> None:
    first = open_writer(window=before)
    await each_alone(first, [("a", 1), ("a", 5)])  # 2, 3 and 4 missing: a ring of `before` bits

    second = open_writer(window=after)
    outcome = await each_alone(second, [("a", 5), ("a", 2), ("a", 2), ("a", 3), ("a", 6)])
    # The rest of the window, as the new writer knows it, behaves as ever.
    outcome += await each_alone(second, [("a", 4), ("a", 6), ("a", 8), ("a", 7), ("a", 7)])

    # The ring is gone: below the highest seq nothing is known (stored again); above, as ever.
    assert outcome[:5] == [DUPLICATE, STORED, STORED, STORED, STORED]
    assert outcome[5:] == [STORED, DUPLICATE, STORED, STORED, DUPLICATE]
    sent = {("a", s) for s in (1, 2, 3, 4, 5, 6, 7, 8)}
    assert set(await in_stream(redis, keys)) == sent  # every batch at least once


async def test_a_window_that_grows_does_not_take_a_seq_never_stored_for_a_duplicate(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    small = open_writer(window=8)
    # 2 is skipped, then leaves the window of 8 while missing: no seq is missing any more.
    await each_alone(small, [("a", 1), ("a", 3), *(("a", s) for s in range(4, 11))])

    larger = open_writer(window=16)
    outcome = await each_alone(larger, [("a", 2)])

    assert outcome == [STORED]  # never stored before: DUPLICATE would lose it
    assert ("a", 2) in await in_stream(redis, keys)


async def test_a_write_of_as_many_batches_as_write_max_batch_accepts_is_decided(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    most = load_settings({"WRITE_MAX_BATCH": "10000"}, ServiceSettings).write_max_batch
    writer = open_writer(max_batch=most)
    batches = [(f"dev-{i % 100}", i // 100) for i in range(most)]

    futures = [writer.submit(device, seq, payload(device, seq)) for device, seq in batches]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)

    assert writer.failed == 0
    assert {o.stored for o in outcomes if isinstance(o, WriteResult)} == {STORED}
    assert await redis.xlen(keys.readings) == 1


# A Python model of exactly these semantics, and the script against it.


class SeqModel:
    """One device's idempotency as the write decides it: ``top`` the highest seq stored,
    ``low`` the first known, ``missing`` the seqs in the window not stored yet."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.top: int | None = None
        self.low = 0
        self.missing: set[int] = set()

    def first_time(self, seq: int) -> bool:
        """Whether ``seq`` is stored (then it is seen, if it can be remembered)."""
        window = self.window
        if self.top is None or seq - self.top >= window:
            self.top = self.low = seq
            self.missing = set()
            return True
        if seq > self.top:
            self.missing = {s for s in self.missing if s > seq - window}
            self.missing |= set(range(self.top + 1, seq))
            self.top = seq
            return True
        if seq <= self.top - window or seq < self.low:
            return True
        if seq in self.missing:
            self.missing.remove(seq)
            return True
        return False


DEVICES = ("a", "b", "c")
seqs = st.one_of(
    st.integers(min_value=0, max_value=60),
    st.integers(min_value=0, max_value=2**53 - 1),
    st.sampled_from([2**53 - 1, 2**53 - 2, 2**53 - 40]),
)
writes = st.lists(
    st.lists(st.tuples(st.sampled_from(DEVICES), seqs), min_size=1, max_size=8),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window=st.sampled_from([8, 16]), writes=writes)
def test_the_script_decides_as_the_model_of_its_semantics(
    window: int, writes: list[list[tuple[str, int]]]
) -> None:
    asyncio.run(_compare_with_model(window, writes))


async def _compare_with_model(window: int, writes: list[list[tuple[str, int]]]) -> None:
    keys = Keys(f"test:{uuid.uuid4().hex[:10]}:")
    redis = Redis.from_url(REDIS_URL)
    connection = RespConnection(REDIS_URL, connect_timeout=5, setup=WRITE_CONNECTION_SETUP)
    writer = ReadingsWriter(
        connection,
        keys,
        max_batch=8,
        max_pending=16,
        max_in_flight=1,
        timeout=5,
        idempotency_window=window,
        idempotency_ttl=3600,
    )
    runner = asyncio.create_task(writer.run())
    models = {device: SeqModel(window) for device in DEVICES}
    expected_stream: list[tuple[str, int]] = []
    try:
        for batches in writes:
            expected = []
            for device, seq in batches:
                new = models[device].first_time(seq)
                expected.append(STORED if new else DUPLICATE)
                if new:
                    expected_stream.append((device, seq))

            assert stored(await write(writer, batches)) == expected, batches

        assert await in_stream(redis, keys) == expected_stream
    finally:
        await cancel_and_wait([runner])
        connection.close()
        found = [key async for key in redis.scan_iter(match=f"{keys.prefix}*")]
        if found:
            await redis.delete(*found)
        await redis.aclose()


# The rate limit: decided first, per batch in order, with the GCRA of service/ratelimit.py.


async def test_refused_batches_are_never_in_the_stream(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    writer = open_writer(policy=Policy("ingest", (Window("minute", 3, 60),), key="device"))

    results = await write(writer, [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("a", 4), ("a", 5)])
    retried = await write(writer, [("a", 4), ("a", 5), ("b", 2)])

    assert [(r.stored, r.verdict) for r in results] == [
        (STORED, ALLOWED),
        (STORED, ALLOWED),
        (STORED, ALLOWED),
        (STORED, ALLOWED),
        (NOT_ATTEMPTED, REFUSED),
        (NOT_ATTEMPTED, REFUSED),
    ]
    assert [(r.stored, r.verdict) for r in retried] == [
        (NOT_ATTEMPTED, REFUSED),
        (NOT_ATTEMPTED, REFUSED),
        (STORED, ALLOWED),
    ]
    assert await in_stream(redis, keys) == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]
    assert writer.refused == 4


async def test_shadow_mode_stores_what_it_would_refuse(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    policy = Policy("ingest", (Window("minute", 2, 60),), key="device", shadow=True)
    writer = open_writer(policy=policy)

    results = await write(writer, [("a", s) for s in (1, 2, 3, 4, 3)])

    assert [(r.stored, r.verdict) for r in results] == [
        (STORED, ALLOWED),
        (STORED, ALLOWED),
        (STORED, SHADOWED),
        (STORED, SHADOWED),
        (DUPLICATE, SHADOWED),
    ]
    assert await in_stream(redis, keys) == [("a", s) for s in (1, 2, 3, 4)]
    assert writer.refused == 0


async def test_the_limit_decides_before_idempotency(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    # 2 per second: a request every 500 ms once the burst of 2 is spent.
    writer = open_writer(policy=Policy("ingest", (Window("second", 2, 1),), key="device"))

    results = await write(writer, [("a", 1), ("a", 1), ("a", 2)])
    await asyncio.sleep(0.6)
    later = await write(writer, [("a", 2)])

    # A duplicate counts against the limit; a refused batch is not looked up, nor remembered:
    # once the limit lets it through it is stored.
    assert [(r.stored, r.verdict, r.remaining) for r in results] == [
        (STORED, ALLOWED, 1),
        (DUPLICATE, ALLOWED, 0),
        (NOT_ATTEMPTED, REFUSED, 0),
    ]
    assert [(r.stored, r.verdict) for r in later] == [(STORED, ALLOWED)]
    assert await in_stream(redis, keys) == [("a", 1), ("a", 2)]


def local_decisions(
    policy: Policy, devices: Sequence[str], monkeypatch: pytest.MonkeyPatch
) -> list[Decision]:
    """``service.ratelimit``'s own GCRA (the per-process one) for these requests, all at one
    instant, as one script run decides them (the clock it reads stopped only meanwhile: the
    event loop reads it too)."""
    limiter = LocalLimiter()
    with monkeypatch.context() as patched:
        patched.setattr("service.ratelimit.time.monotonic", lambda: 1_000_000.0)
        return [limiter.check(policy, device) for device in devices]


@pytest.mark.parametrize("shadow", [False, True], ids=["enforced", "shadow"])
async def test_remaining_and_reset_are_those_of_the_rate_limiter(
    open_writer: OpenWriter, monkeypatch: pytest.MonkeyPatch, shadow: bool
) -> None:
    policy = Policy(
        "ingest", (Window("minute", 5, 60), Window("second", 2, 1)), key="device", shadow=shadow
    )
    writer = open_writer(policy=policy)
    batches = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("a", 4), ("b", 2), ("b", 3)]

    results = await write(writer, batches)

    decided = [
        decision_from_reply(policy, r.verdict, r.window, r.remaining, r.reset_ms) for r in results
    ]
    assert decided == local_decisions(policy, [device for device, _ in batches], monkeypatch)
    # Spelled out: the second window decides while it is the nearer to full.
    second = policy.windows[1]
    assert [(d.allowed, d.over, d.window, d.remaining, d.reset_ms) for d in decided[:3]] == [
        (True, False, second, 1, 500.0),
        (True, False, second, 0, 1000.0),
        (shadow, True, second, 0, 500.0),
    ]
    assert [r.stored for r in results] == [
        STORED,
        STORED,
        STORED if shadow else NOT_ATTEMPTED,
        STORED,
        STORED if shadow else NOT_ATTEMPTED,
        STORED,
        STORED if shadow else NOT_ATTEMPTED,
    ]


async def test_without_a_policy_no_limit_is_decided(writer: ReadingsWriter) -> None:
    results = await write(writer, [("a", s) for s in range(1, 50)])

    assert {(r.stored, r.verdict, r.window, r.remaining, r.reset_ms) for r in results} == {
        (STORED, NO_POLICY, 0, 0, 0)
    }


# The rare path: not every batch stored, the entry replaced by one of those stored.


async def test_a_write_storing_some_batches_leaves_one_entry_of_them_in_order(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    writer = open_writer(policy=Policy("ingest", (Window("minute", 3, 60),), key="device"))
    await write(writer, [("a", 1)])
    traces = [b"00-" + b"%032x" % i + b"-" + b"1" * 16 + b"-01" for i in range(6)]

    results = await write(
        writer,
        [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("c", 1), ("b", 1)],
        traces=[traces[0], traces[1], b"", traces[3], traces[4], traces[5]],
    )

    assert stored(results) == [DUPLICATE, STORED, STORED, NOT_ATTEMPTED, STORED, DUPLICATE]
    [_, (_, fields)] = await entries(redis, keys)
    received_ms = int(decode_entries(fields)[0].received)
    # The batches stored, in order; their traces re-indexed (a trace of index 1 is none).
    expected = encode_write(
        received_ms,
        [(payload("b", 1), traces[1]), (payload("a", 2), b""), (payload("c", 1), traces[4])],
    )
    assert list(fields.items()) == list(expected.items())
    assert decode_entries(fields) == [
        ReadingsEntry(payload("b", 1), b"%d" % received_ms, traces[1]),
        ReadingsEntry(payload("a", 2), b"%d" % received_ms, None),
        ReadingsEntry(payload("c", 1), b"%d" % received_ms, traces[4]),
    ]


async def test_a_write_storing_no_batch_leaves_no_entry(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    writer = open_writer(policy=Policy("ingest", (Window("minute", 4, 60),), key="device"))
    await write(writer, [("a", 1), ("a", 2)])
    [(first_id, _)] = await entries(redis, keys)

    duplicates = await write(writer, [("a", 2), ("a", 1)], traces=[TRACE, TRACE])
    refused = await write(writer, [("a", 3), ("a", 4)])

    assert stored(duplicates) == [DUPLICATE, DUPLICATE]
    assert stored(refused) == [NOT_ATTEMPTED, NOT_ATTEMPTED]
    assert [entry_id for entry_id, _ in await entries(redis, keys)] == [first_id]


# Generations: a device's state is read from the current hash, else the previous one, and
# written to the current one, which expires at the end of the next generation.


async def start_of_a_generation(redis: Redis, generation_ms: int) -> int:
    """Wait (on Redis's clock) until the next generation starts; its number."""
    now = await redis_ms(redis)
    generation = now // generation_ms + 1
    await asyncio.sleep((generation * generation_ms - now) / 1000 + 0.02)
    return generation


async def test_state_is_found_from_the_next_generation_and_gone_after_two(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    writer = open_writer(ttl=1)  # no policy: a generation is the TTL, 1 s
    first = await start_of_a_generation(redis, 1000)
    await write(writer, [("kept", 1), ("dropped", 1), ("gapped", 1), ("gapped", 3)])

    hashes = await state_hashes(redis, keys)
    assert list(hashes) == [first]
    assert set(hashes[first]) == {b"kept", b"dropped", b"gapped", b"gapped#"}  # 2 is missing
    state_key = f"{keys.ingest_state_prefix}{first}"
    assert await redis.pexpiretime(state_key) == (first + 2) * 1000

    assert await start_of_a_generation(redis, 1000) == first + 1
    next_generation = await write(
        writer, [("kept", 1), ("gapped", 3), ("gapped", 2), ("gapped", 2)]
    )

    assert await start_of_a_generation(redis, 1000) == first + 2
    after_two = await write(writer, [("dropped", 1), ("kept", 1)])

    # Found from the previous generation, the missing seq with it, and copied forward.
    assert stored(next_generation) == [DUPLICATE, DUPLICATE, STORED, DUPLICATE]
    # Untouched for two generations: gone, so stored again; touched meanwhile: still there.
    assert stored(after_two) == [STORED, DUPLICATE]
    assert await redis.exists(state_key) == 0
    for generation in await state_hashes(redis, keys):
        expires = await redis.pexpiretime(f"{keys.ingest_state_prefix}{generation}")
        assert expires == (generation + 2) * 1000
    assert await in_stream(redis, keys) == [
        ("kept", 1),
        ("dropped", 1),
        ("gapped", 1),
        ("gapped", 3),
        ("gapped", 2),
        ("dropped", 1),
    ]


async def test_a_generation_is_at_least_as_long_as_the_longest_policy_window(
    open_writer: OpenWriter, redis: Redis, keys: Keys
) -> None:
    """So that no TAT still ahead is forgotten with its generation."""
    policy = Policy("ingest", (Window("burst", 100, 1), Window("slow", 1000, 3)), key="device")
    writer = open_writer(ttl=1, policy=policy)

    before = await redis_ms(redis)
    await write(writer, [("a", 1)])
    after = await redis_ms(redis)

    [generation] = await state_hashes(redis, keys)
    assert generation * 3000 <= after
    assert before < (generation + 1) * 3000
    state_key = f"{keys.ingest_state_prefix}{generation}"
    assert await redis.pexpiretime(state_key) == (generation + 2) * 3000
    assert 3000 < await redis.pttl(state_key) <= 2 * 3000


async def test_the_state_hash_expires_within_two_generations(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    await write(writer, [(f"dev-{i}", 1) for i in range(20)])

    [generation] = await state_hashes(redis, keys)
    state_key = f"{keys.ingest_state_prefix}{generation}"
    assert await redis.hlen(state_key) == 20
    assert await redis.pexpiretime(state_key) == (generation + 2) * 3_600_000
    assert 3_600_000 < await redis.pttl(state_key) <= 2 * 3_600_000


# Failures: the script flushed from the server, the readings key of another type.


async def test_a_write_after_script_flush_stores_each_batch_exactly_once(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    await write(writer, [("a", 1), ("a", 2)])
    await redis.script_flush()

    results = await write(writer, [("a", 2), ("a", 3), ("b", 1), ("a", 3)])
    after = await write(writer, [("a", 4)])

    assert stored(results) == [DUPLICATE, STORED, STORED, DUPLICATE]
    assert stored(after) == [STORED]
    assert writer.reloads == 1
    # The entry the flushed write added undecided was removed before the write was sent again.
    stream = await entries(redis, keys)
    assert [[b.batch for b in decode_entries(fields)] for _, fields in stream] == [
        [payload("a", 1), payload("a", 2)],
        [payload("a", 3), payload("b", 1)],
        [payload("a", 4)],
    ]
    info = await redis.xinfo_stream(keys.readings)
    assert info["entries-added"] == 5  # 3 kept; the undecided one and the one replaced


async def test_a_readings_key_that_is_no_stream_fails_the_write_and_changes_nothing(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    await write(writer, [("a", 1)])
    state_before = await state_hashes(redis, keys)
    await redis.delete(keys.readings)
    await redis.set(keys.readings, b"not a stream")

    futures = [
        writer.submit(device, seq, payload(device, seq)) for device, seq in [("a", 2), ("b", 1)]
    ]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)

    assert [type(o) for o in outcomes] == [StoreUnavailableError] * 2
    assert writer.failed == 2
    assert await redis.get(keys.readings) == b"not a stream"
    assert await state_hashes(redis, keys) == state_before
    # Once the stream is back, the batches are new: nothing was remembered of the failed write.
    await redis.delete(keys.readings)
    assert stored(await write(writer, [("a", 2), ("b", 1)])) == [STORED, STORED]
    assert await in_stream(redis, keys) == [("a", 2), ("b", 1)]


# A rolling upgrade: entries of the older one-batch format beside the service's own.


async def test_one_batch_entries_of_an_older_service_and_new_entries_read_in_order(
    writer: ReadingsWriter, redis: Redis, keys: Keys
) -> None:
    async def add_old(device: str, seq: int, trace: bytes | None) -> None:
        fields: dict[Any, Any] = encode_entry(payload(device, seq), 1_764_000_000_000, trace)
        await redis.xadd(keys.readings, fields)

    await add_old("old", 1, TRACE)
    await add_old("old", 2, None)
    await write(writer, [("new", 1), ("new", 2)], traces=[b"", TRACE])
    await add_old("old", 3, None)  # an older service still running beside the new one
    await write(writer, [("new", 3)])

    read = batches_of(await entries(redis, keys))

    assert [msgspec.json.decode(b.batch)["seq"] for b in read] == [1, 2, 1, 2, 3, 3]
    assert [msgspec.json.decode(b.batch)["device_id"] for b in read] == [
        "old",
        "old",
        "new",
        "new",
        "old",
        "new",
    ]
    assert [b.traceparent for b in read] == [TRACE, None, None, TRACE, None, None]
    assert [b.received_ms for b in read][:2] == [1_764_000_000_000] * 2
