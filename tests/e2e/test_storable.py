"""Every acknowledged batch is stored: the service's validation against Postgres's columns.

Generated batches, edge values first (subnormal and underflowing numbers, -0.0, huge
exponents, the largest integers, unicode and NUL in strings, arrays at the sample limit),
go to the real service over HTTP; what it acknowledges goes through the real worker into
Postgres. Each 202 must become a row holding the values sent, each refusal must be a JSON
4xx, and nothing may reach the dead-letter stream or be refused by Postgres on the way.
Numbers are generated as JSON text, so forms no Python float prints (``1e-400``) are sent.
"""

import asyncio
import io
import json
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from shared.devices import DeviceExistsError, add_device
from shared.keys import Keys
from shared.settings import ServiceSettings
from shared.wire import MAX_SAMPLES, MAX_SEQ, REAL_UNDERFLOW, TS_MAX_MS, TS_MIN_MS
from tests.support.env import REDIS_URL
from tests.support.worker import worker_settings
from worker.app import create_app as create_worker_app

REFUSALS = {400, 403, 413, 422}
Client = TestClient[web.Request, web.Application]
Row = tuple[int, float, list[float], float | None, float | None]


class StoreHarness:
    """The service and the worker on one loop, driven from synchronous examples."""

    def __init__(
        self,
        runner: asyncio.Runner,
        service: Client,
        worker: TestServer,
        redis: Redis,
        keys: Keys,
        database_url: str,
    ) -> None:
        self.runner = runner
        self.service = service
        self.worker = worker
        self.redis = redis
        self.keys = keys
        self.database_url = database_url
        self.tokens: dict[str, str] = {}
        # Every (device, seq) acknowledged so far: its row holds the values first sent.
        self.acknowledged: set[tuple[str, int]] = set()

    def token(self, device_id: str) -> str:
        """The device's token, registering it (and waiting until the service knows it)."""
        if device_id not in self.tokens:
            self.tokens[device_id] = self.runner.run(self._register(device_id))
        return self.tokens[device_id]

    async def _register(self, device_id: str) -> str:
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            try:
                token = await add_device(conn, device_id)
            except DeviceExistsError:
                token = await add_device(conn, device_id, rotate=True)
        tokens = self.service.app[INGEST].tokens
        async with asyncio.timeout(10):
            while tokens.authenticate(f"Bearer {token}") != device_id:
                await asyncio.sleep(0.01)
        return token

    def post(self, body: bytes, token: str) -> tuple[int, Any]:
        async def go() -> tuple[int, Any]:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            # A file object: aiohttp's client warns (an error here) on large raw bytes bodies.
            data = io.BytesIO(body)
            response = await self.service.post("/ingestion/ppg", data=data, headers=headers)
            return response.status, await response.json()

        return self.runner.run(go())

    def stored(self, device_id: str, seq: int) -> Row:
        """The row of (device, seq) once the worker has stored it; fails at once on a dead
        letter or an entry Postgres refused."""

        async def go() -> Row:
            async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
                async with asyncio.timeout(15):
                    while True:
                        await self._no_failures()
                        cur = await conn.execute(
                            "SELECT round(extract(epoch FROM ts) * 1000)::bigint, rate_hz, ppg,"
                            " hr, spo2 FROM readings WHERE device_id = %s AND seq = %s",
                            (device_id, seq),
                        )
                        row = await cur.fetchone()
                        if row is not None:
                            return cast(Row, row)
                        await asyncio.sleep(0.02)

        return self.runner.run(go())

    async def _no_failures(self) -> None:
        """Nothing dead-lettered or refused by Postgres (cleared once reported, so the next
        example starts clean)."""
        dead = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrange(self.keys.readings_dead)
        )
        refused = await self.redis.hgetall(self.keys.readings_errors)
        if dead or refused:
            await self.redis.delete(self.keys.readings_dead, self.keys.readings_errors)
        # A dead letter holds one batch (field ``d``), or a whole entry that did not decode.
        reasons = [(f[b"dl_reason"][:300], f.get(b"d", b"")[:300]) for _, f in dead]
        assert reasons == [], "dead letters"
        assert refused == {}, "refused by Postgres"

    def check_no_failures(self) -> None:
        self.runner.run(self._no_failures())


@pytest.fixture(scope="module")
def harness(migrated: str) -> Iterator[StoreHarness]:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    config = ServiceSettings(
        redis_url=REDIS_URL,
        redis_key_prefix=prefix,
        database_url=migrated,
        pod_name=f"store-{prefix.split(':')[1]}",
        token_refresh_interval=0.02,
        telemetry_flush_interval=0.05,
        shutdown_timeout=2.0,
    )
    # A batch Postgres refuses goes to the dead-letter stream at its first delivery.
    worker_config = worker_settings(
        replace(config, pod_name=config.pod_name + "-worker"),
        worker_block_ms=50,
        worker_dead_letter_after=1,
    )
    with asyncio.Runner() as runner:

        async def start() -> StoreHarness:
            service = TestClient(TestServer(create_app(config)))
            await service.start_server()
            worker = TestServer(create_worker_app(worker_config))
            await worker.start_server()
            redis = Redis.from_url(REDIS_URL)
            return StoreHarness(runner, service, worker, redis, Keys(prefix), migrated)

        harness = runner.run(start())
        yield harness

        async def stop() -> None:
            await harness.service.close()
            await harness.worker.close()
            keys = [k async for k in harness.redis.scan_iter(match=f"{prefix}*")]
            if keys:
                await harness.redis.delete(*keys)
            await harness.redis.aclose()

        runner.run(stop())


# Numbers as JSON text. Values at the edges of the columns and of double precision, and
# texts no float prints: below the smallest double, with long exponents or long zero runs.
SMALLEST_ABOVE_UNDERFLOW = math.nextafter(REAL_UNDERFLOW, 1.0)
UNDERFLOWING_TEXTS = [
    "1e-400",
    "-1e-400",
    "1E-0400",
    "123e-330",
    "2.4703282292062327e-324",
    "1e-99999999999999999999",
    "0." + "0" * 330 + "1",
    "0." + "0" * 250 + "1e-80",
    "9" * 30 + "e-354",
]
TINY_DOUBLE_TEXTS = [
    "5e-324",
    "-5e-324",
    "2.4703282292062328e-324",
    "1e-310",
    "1" + "0" * 400 + "e-720",
]
ZERO_TEXTS = ["0", "-0", "0.0", "-0.0", "0e-999", "0E+5"]


def _floats(lo: float, hi: float) -> st.SearchStrategy[str]:
    return st.floats(min_value=lo, max_value=hi).map(repr)


def _ints(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.integers(min_value=lo, max_value=hi).map(str)


samples = st.one_of(
    _floats(-1e9, 1e9),
    _floats(-1e-300, 1e-300),
    _ints(-(10**9), 10**9),
    st.sampled_from(UNDERFLOWING_TEXTS + TINY_DOUBLE_TEXTS + ZERO_TEXTS),
    st.sampled_from(["1e9", "-1e9", "1E+9", "0.000001E-5", "5e-1", "1.5e-300"]),
)
separators = st.sampled_from([",", ", ", " ,\n\t"])


@st.composite
def ppg_arrays(draw: st.DrawFn) -> str:
    separator = draw(separators)
    if draw(st.integers(0, 9)) == 0:  # at the limit: a few values repeated
        values = draw(st.lists(samples, min_size=1, max_size=3))
        count = draw(st.sampled_from([MAX_SAMPLES - 1, MAX_SAMPLES]))
        items = [values[i % len(values)] for i in range(count)]
    else:
        items = draw(st.lists(samples, min_size=1, max_size=40))
    return "[" + separator.join(items) + "]"


def _vital(top: float) -> st.SearchStrategy[str]:
    return st.one_of(
        _floats(SMALLEST_ABOVE_UNDERFLOW, top),
        _ints(0, int(top)),
        st.sampled_from(
            ZERO_TEXTS
            + UNDERFLOWING_TEXTS[:3]
            + [repr(SMALLEST_ABOVE_UNDERFLOW), "1e-40", repr(top)]
        ),
    )


valid_fields: dict[str, st.SearchStrategy[str | None]] = {
    "device_id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True).map(json.dumps),
    "seq": st.one_of(_ints(0, MAX_SEQ), st.sampled_from(["0", str(MAX_SEQ)])),
    "ts": st.one_of(_ints(TS_MIN_MS, TS_MAX_MS), st.sampled_from([str(TS_MIN_MS), str(TS_MAX_MS)])),
    "rate_hz": st.one_of(
        _floats(SMALLEST_ABOVE_UNDERFLOW, 10_000),
        _ints(1, 10_000),
        st.sampled_from([repr(SMALLEST_ABOVE_UNDERFLOW), "1.401298464324817e-45", "1e-40", "1E4"]),
    ),
    "ppg": ppg_arrays(),
    "hr": st.one_of(st.none(), st.just("null"), _vital(400)),
    "spo2": st.one_of(st.none(), st.just("null"), _vital(100)),
}

# Values just past a bound, of the wrong kind, or that no column can hold.
NOT_A_NUMBER = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "null", "true", '"1"', "[]"]
TOO_MANY = "[" + ",".join(["0.5"] * (MAX_SAMPLES + 1)) + "]"
edge_fields: dict[str, st.SearchStrategy[str | None]] = {
    "device_id": st.one_of(
        st.text(max_size=70).map(json.dumps),
        st.text(st.characters(codec="utf-8"), max_size=70).map(
            lambda s: json.dumps(s, ensure_ascii=False)
        ),
        st.sampled_from(['"abc\\n"', '"abc\\u0000"', '"\\u0000"', f'"{"a" * 65}"', '""', '"dév"']),
    ),
    "seq": st.sampled_from(
        [*NOT_A_NUMBER, "-1", str(MAX_SEQ + 1), str(2**63), str(2**64), "1.0", "1e3", "-0", "0.5"]
    ),
    "ts": st.sampled_from(
        [*NOT_A_NUMBER, str(TS_MIN_MS - 1), str(TS_MAX_MS + 1), "1.764e12", str(2**63), "-1"]
    ),
    "rate_hz": st.one_of(
        st.sampled_from(
            [
                *NOT_A_NUMBER,
                *UNDERFLOWING_TEXTS[:2],
                "0",
                "-0.0",
                "5e-324",
                "1e-46",
                "-1",
                "1e39",
                repr(REAL_UNDERFLOW),
                repr(math.nextafter(10000, 100000.0)),
                "3.4028235e38",
            ]
        ),
        _floats(-1e-300, 1e-300),
    ),
    "ppg": st.one_of(
        st.sampled_from(
            [
                *NOT_A_NUMBER,
                TOO_MANY,
                "[1e400]",
                "[1.0000000000000002e9]",
                "[-1e10]",
                "[[1]]",
                '["1"]',
                "[null]",
                "[NaN]",
                "[1,]",
                "1",
            ]
        ),
        st.lists(st.sampled_from(["1e-400", "1e400", "1e9", "0"]), min_size=1, max_size=5).map(
            lambda items: "[" + ",".join(items) + "]"
        ),
    ),
    "hr": st.one_of(
        st.sampled_from(
            [
                *NOT_A_NUMBER,
                "5e-324",
                "-5e-324",
                "1e-46",
                "400.00000000000006",
                "-1",
                repr(REAL_UNDERFLOW),
            ]
        ),
        _floats(-1e-300, 1e-300),
    ),
    "spo2": st.one_of(
        st.sampled_from(["5e-324", repr(REAL_UNDERFLOW), "1e-46", "100.00000000000001", "-1e-9"]),
        _floats(-1e-300, 1e-300),
    ),
}
FIELDS = tuple(valid_fields)


@st.composite
def batches(draw: st.DrawFn) -> dict[str, str | None]:
    """A batch as JSON texts per field (``None``: left out): valid, edge values included, and
    in half of them one field replaced by a value at or past its bounds."""
    fields = {name: draw(strategy) for name, strategy in valid_fields.items()}
    if draw(st.booleans()):
        name = draw(st.sampled_from(FIELDS))
        fields[name] = draw(edge_fields[name])
    return fields


def _body(fields: dict[str, str | None]) -> bytes:
    return (
        "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items() if v is not None) + "}"
    ).encode()


def _same_real(stored: float | None, sent: float | None) -> bool:
    """``sent`` as a Postgres real holds it: rounded to single precision."""
    if stored is None or sent is None:
        return stored is sent
    return math.isclose(stored, sent, rel_tol=2.0**-23, abs_tol=2.0**-149)


def _registrable(text: str | None) -> str | None:
    """The device id in ``text`` when a device can have it (and so a token)."""
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return value if isinstance(value, str) and DEVICE_ID.fullmatch(value) else None


def _ingest_and_check(harness: StoreHarness, fields: dict[str, str | None]) -> int:
    """Send the batch; a 202 must become its row, anything else a JSON refusal."""
    device_id = _registrable(fields["device_id"])
    token = harness.token(device_id if device_id is not None else BASE_DEVICE)
    body = _body(fields)

    status, reply = harness.post(body, token)

    assert status == 202 or status in REFUSALS, (status, reply)
    if status != 202:
        assert set(reply["error"]) == {"code", "message", "details"}
        harness.check_no_failures()
        return status
    sent = json.loads(body)  # Python's own parser: the values as sent, correctly rounded
    ts, rate_hz, ppg, hr, spo2 = harness.stored(sent["device_id"], sent["seq"])
    batch = (sent["device_id"], sent["seq"])
    sent_before = batch in harness.acknowledged
    harness.acknowledged.add(batch)
    # Only a seq stored before is a duplicate. One stored before but older than the device's
    # idempotency window (a seq far from the others: examples pick them anywhere) is stored
    # again; its first row is the one checked, when it was first acknowledged.
    assert sent_before or not reply["duplicate"]
    if sent_before:
        return status
    assert reply == {"accepted": len(sent["ppg"]), "seq": sent["seq"], "duplicate": False}
    assert ts == sent["ts"]
    assert ppg == [float(v) for v in sent["ppg"]]
    assert _same_real(rate_hz, float(sent["rate_hz"]))
    for stored, name in ((hr, "hr"), (spo2, "spo2")):
        value = sent.get(name)
        assert _same_real(stored, None if value is None else float(value)), name
    return status


BASE_DEVICE = "store-base"
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fields=batches())
def test_every_acknowledged_batch_becomes_its_row(
    harness: StoreHarness, fields: dict[str, str | None]
) -> None:
    event(f"status {_ingest_and_check(harness, fields)}")


def _batch(seq: int, **texts: str | None) -> dict[str, str | None]:
    fields: dict[str, str | None] = {
        "device_id": json.dumps(BASE_DEVICE),
        "seq": str(seq),
        "ts": str(1_764_000_000_000 + seq % 10**9),
        "rate_hz": "50",
        "ppg": "[0.5, 0.6]",
        "hr": "72",
        "spo2": "98",
    }
    fields.update(texts)
    return fields


@pytest.mark.parametrize(
    "ppg",
    [
        "[1e-400, -1e-400, 0.5]",
        "[123e-330, 1E-0400]",
        "[0." + "0" * 330 + "1]",
        "[0." + "0" * 250 + "1e-80, 5e-324]",
    ],
)
def test_a_sample_below_the_smallest_double_is_stored_as_the_zero_acknowledged(
    harness: StoreHarness, ppg: str
) -> None:
    seq = uuid.uuid4().int % MAX_SEQ

    assert _ingest_and_check(harness, _batch(seq, ppg=ppg)) == 202


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("rate_hz", "5e-324"),
        ("rate_hz", repr(REAL_UNDERFLOW)),
        ("hr", "5e-324"),
        ("hr", "1e-46"),
        ("spo2", "1e-46"),
        ("device_id", '"store-base\\n"'),
        ("seq", "1.5"),
        ("ts", "1764000000000.5"),
    ],
)
def test_a_value_its_column_cannot_hold_is_refused_naming_the_field(
    harness: StoreHarness, field: str, text: str
) -> None:
    token = harness.token(BASE_DEVICE)
    status, reply = harness.post(_body({**_batch(1), field: text}), token)

    assert (status, reply["error"]["details"]) == (422, {"field": field})
    harness.check_no_failures()


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("rate_hz", repr(SMALLEST_ABOVE_UNDERFLOW)),
        ("rate_hz", "1e-40"),
        ("hr", "1e-40"),
        ("hr", "-0.0"),
        ("hr", "1e-400"),
        ("spo2", repr(SMALLEST_ABOVE_UNDERFLOW)),
    ],
)
def test_the_smallest_values_a_real_holds_are_stored(
    harness: StoreHarness, field: str, text: str
) -> None:
    seq = uuid.uuid4().int % MAX_SEQ

    assert _ingest_and_check(harness, _batch(seq, **{field: text})) == 202


@pytest.mark.parametrize("form", ["{}.0", "{}e0", "{}.000E+0"])
def test_a_seq_and_ts_written_as_whole_floats_are_the_integers_they_stand_for(
    harness: StoreHarness, form: str
) -> None:
    """JSON Schema's ``integer`` (the OpenAPI document's) is any number without a fraction."""
    seq = uuid.uuid4().int % 10**9
    fields = {**_batch(seq), "seq": form.format(seq), "ts": form.format(1_764_000_000_000)}

    assert _ingest_and_check(harness, fields) == 202
