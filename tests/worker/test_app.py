"""The worker in-process: readings stored once, dead letters, alerts, analysis jobs, trimming.

The worker app is built by its real factory and runs against the real Redis and Postgres;
the readings come through the stream in the service's format. The AI service is the
reference one (``analysis.app``), or, where it must fail on demand, a stand-in.
"""

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec
import numpy as np
import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from analysis.app import create_app as create_analysis_app
from shared.keys import Keys
from shared.readings import PERSIST_GROUP, DeadLetter, decode_dead_letter, decode_entry
from shared.settings import AnalysisSettings, ServiceSettings, variables
from shared.telemetry import (
    BATCH_FIELD,
    Kind,
    Record,
    WorkerHeartbeat,
    decode_batch,
    decode_heartbeat,
)
from tests.support.env import AiohttpClient, Device, DeviceFactory
from tests.support.settings import for_program
from tests.support.worker import (
    BASE_TS,
    add_bodies,
    add_readings,
    eventually,
    reading,
    stored_counts,
)
from tests.support.worker import worker_settings as tuned
from worker.analysis_jobs import CircuitBreaker
from worker.app import create_app
from worker.appkeys import WORKER
from worker.groups import stream_entries
from worker.persist import safe_trim_id

Client = TestClient[web.Request, web.Application]
StartWorker = Callable[..., Awaitable[Client]]
Entries = list[tuple[bytes, dict[bytes, bytes]]]


@pytest.fixture
def start_worker(aiohttp_client: AiohttpClient, settings: ServiceSettings) -> StartWorker:
    async def start(**overrides: Any) -> Client:
        return await aiohttp_client(create_app(tuned(settings, **overrides)))

    return start


async def telemetry_records(redis: Redis, keys: Keys, pod: str) -> list[Record]:
    entries = cast(Entries, await redis.xrange(keys.telemetry(pod)))
    return [r for _, fields in entries for r in decode_batch(fields[BATCH_FIELD]).records]


async def query(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall()


async def test_every_reading_is_stored_once_with_its_values_and_acknowledged(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    devices = ["dev-a-" + keys.prefix.split(":")[1], "dev-b-" + keys.prefix.split(":")[1]]
    batches = [reading(d, seq, hr=60 + seq % 7) for d in devices for seq in range(40)]
    # A retry the service stored twice (its idempotency window had passed) and a batch
    # without vitals.
    batches += [batches[3], reading(devices[0], 99, hr=None, spo2=None, ppg=[1, -2.5e-3, 3e5])]
    await add_readings(redis, keys, batches)

    await start_worker()

    await eventually(lambda: persisted(redis, keys))
    counts = await stored_counts(settings.database_url, devices)
    rows = await query(
        settings.database_url,
        "SELECT ppg, hr, spo2, rate_hz, ts, received_at IS NOT NULL FROM readings"
        " WHERE device_id = %s AND seq = 99",
        devices[0],
    )
    assert sorted(counts.values()) == [1] * 81
    assert rows[0][:4] == ([1.0, -0.0025, 300000.0], None, None, 50.0)
    assert rows[0][4].timestamp() * 1000 == BASE_TS + 99_000
    assert rows[0][5] is True


async def test_the_stream_is_trimmed_only_below_what_every_group_acknowledged(
    start_worker: StartWorker, redis: Redis, keys: Keys
) -> None:
    device = "dev-trim-" + keys.prefix.split(":")[1]
    # One batch to an entry: 30 entries.
    await add_readings(redis, keys, [reading(device, seq) for seq in range(30)], per_entry=1)
    # A second group that read 10 entries and acknowledged none of them.
    await redis.xgroup_create(keys.readings, "other", id="0")
    slow = stream_entries(await redis.xreadgroup("other", "c", {keys.readings: ">"}, count=10))
    oldest_unacked = slow[0][0]

    await start_worker()
    await eventually(
        lambda: _pending_is(redis, keys, PERSIST_GROUP, 0, lag=0),
    )
    await asyncio.sleep(0.3)  # a few janitor rounds

    first = cast(Entries, await redis.xrange(keys.readings, count=1))
    assert first[0][0] == oldest_unacked
    assert await safe_trim_id(redis, keys.readings) == oldest_unacked

    await redis.xack(keys.readings, "other", *[entry_id for entry_id, _ in slow])
    rest = stream_entries(await redis.xreadgroup("other", "c", {keys.readings: ">"}))
    await redis.xack(keys.readings, "other", *[entry_id for entry_id, _ in rest])
    await eventually(lambda: _length_is(redis, keys.readings, 0))


async def _pending_is(redis: Redis, keys: Keys, group: str, pending: int, *, lag: int) -> bool:
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(keys.readings)}
    g = groups.get(group)
    return g is not None and bool(g["pending"] == pending and g["lag"] == lag)


async def _length_is(redis: Redis, stream: str, length: int) -> bool:
    return int(await redis.xlen(stream)) == length


async def test_poison_entries_go_to_the_dead_letter_stream_and_the_rest_flow(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = "dev-poison-" + keys.prefix.split(":")[1]
    await add_readings(redis, keys, [reading(device, seq) for seq in range(5)])
    # Not JSON; and valid JSON the service would have refused: Postgres cannot hold 1e999
    # in a double. Each an entry of its own, in the one-batch format an older service wrote
    # (a batch of an entry of several: tests/worker/test_entries.py).
    rejected = msgspec.json.encode(reading(device, 5)).replace(b"0.65", b"1e999")
    await add_bodies(redis, keys, [b"{not json", rejected], one_batch_format=True)
    await add_readings(redis, keys, [reading(device, seq) for seq in range(6, 10)])

    worker = await start_worker(worker_dead_letter_after=2, worker_claim_idle=0.2)
    await eventually(lambda: _length_is(redis, keys.readings_dead, 2))
    await eventually(lambda: _pending_is(redis, keys, PERSIST_GROUP, 0, lag=0))

    dead = await dead_letters(redis, keys)
    kinds = {letter.kind: letter for letter in dead}
    counts = await stored_counts(settings.database_url, [device])
    assert set(kinds) == {"undecodable", "rejected"}
    assert "not a valid batch" in kinds["undecodable"].reason
    assert "out of range" in kinds["rejected"].reason
    assert kinds["rejected"].deliveries == 2
    assert decode_entry(kinds["rejected"].fields).batch == rejected
    # The whole entry, as it was: its one batch.
    assert [letter.index for letter in dead] == [None, None]
    assert sorted(counts) == [(device, seq) for seq in range(10) if seq != 5]
    assert worker.app[WORKER].persister.dead_letters == 2
    assert await redis.hlen(keys.readings_errors) == 0
    records = await telemetry_records(redis, keys, settings.pod)
    await eventually(lambda: _has_dead_letter_records(redis, keys, settings.pod))
    assert any(r[0] == Kind.PERSIST and r[3] == 422 for r in records)


async def dead_letters(redis: Redis, keys: Keys) -> list[DeadLetter]:
    entries = cast(Entries, await redis.xrange(keys.readings_dead))
    return [decode_dead_letter(fields) for _, fields in entries]


async def _has_dead_letter_records(redis: Redis, keys: Keys, pod: str) -> bool:
    records = await telemetry_records(redis, keys, pod)
    return sorted(r[1] for r in records if r[0] == Kind.DEAD_LETTER) == ["rejected", "undecodable"]


async def test_entries_from_before_the_bounds_met_the_columns_never_wait_to_be_dead(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    """Entries an older service acknowledged: samples too small for a double are stored as
    the 0 it decoded them to; vitals a real cannot hold are dead letters at once."""
    device = "dev-tiny-" + keys.prefix.split(":")[1]
    tiny_samples = msgspec.json.encode(reading(device, 1, ppg=[0.25, 7.0, 8.0])).replace(
        b"7.0,8.0", b"1e-400,-123E-0330"
    )
    # In the one-batch format, as an older service wrote them.
    await add_bodies(redis, keys, [tiny_samples], one_batch_format=True)
    await add_readings(
        redis,
        keys,
        [reading(device, 2, rate_hz=5e-324), reading(device, 3)],
        one_batch_format=True,
    )

    worker = await start_worker(worker_dead_letter_after=5, worker_claim_idle=0.2)
    await eventually(lambda: persisted(redis, keys))

    rows = await query(
        settings.database_url,
        "SELECT seq, ppg FROM readings WHERE device_id = %s ORDER BY seq",
        device,
    )
    dead = await dead_letters(redis, keys)
    assert rows == [(1, [0.25, 0.0, -0.0]), (3, [0.5, 0.6, 0.7, 0.65])]
    assert [(letter.kind, letter.deliveries) for letter in dead] == [("undecodable", 1)]
    assert "rate_hz" in dead[0].reason
    assert worker.app[WORKER].persister.rejected == 0


async def alerts_of(database_url: str, device: str) -> list[tuple[Any, ...]]:
    return await query(
        database_url,
        "SELECT rule, cleared_at IS NULL, started_at, value FROM alerts WHERE device_id = %s"
        " ORDER BY id",
        device,
    )


async def persisted(redis: Redis, keys: Keys) -> bool:
    return await _pending_is(redis, keys, PERSIST_GROUP, 0, lag=0)


async def test_an_hr_alert_opens_once_after_its_duration_and_clears(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = "dev-tachy-" + keys.prefix.split(":")[1]
    await start_worker(alert_hr_duration=5.0, alert_max_gap=3.0)

    async def send(seqs: range, hr: float) -> list[tuple[Any, ...]]:
        for seq in seqs:  # one round each, as a device sends them
            await add_readings(redis, keys, [reading(device, seq, hr=hr)])
            await eventually(lambda: persisted(redis, keys))
        return await alerts_of(settings.database_url, device)

    short_spike = await send(range(0, 3), 150)  # 2 s of it: shorter than the duration
    normal = await send(range(3, 4), 80)
    opened = await send(range(4, 10), 150)  # 5 s from seq 4 to seq 9
    still_high = await send(range(10, 14), 155)
    cleared = await send(range(14, 15), 90)
    again = await send(range(15, 21), 150)

    assert short_spike == normal == []
    assert [(rule, is_open) for rule, is_open, _, _ in opened] == [("hr_high", True)]
    assert opened[0][2].timestamp() * 1000 == BASE_TS + 4000
    assert still_high == opened
    assert [(rule, is_open) for rule, is_open, _, _ in cleared] == [("hr_high", False)]
    assert [(rule, is_open) for rule, is_open, _, _ in again] == [
        ("hr_high", False),
        ("hr_high", True),
    ]
    await eventually(lambda: _alert_records_are(redis, keys, settings.pod, 3))
    records = await telemetry_records(redis, keys, settings.pod)
    alerts = [(r[1], r[2]) for r in records if r[0] == Kind.ALERT]
    assert alerts == [("hr_high", "open"), ("hr_high", "clear"), ("hr_high", "open")]


async def _alert_records_are(redis: Redis, keys: Keys, pod: str, count: int) -> bool:
    records = await telemetry_records(redis, keys, pod)
    return sum(r[0] == Kind.ALERT for r in records) == count


async def test_a_gap_in_the_data_restarts_the_duration_and_low_spo2_alerts(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = "dev-desat-" + keys.prefix.split(":")[1]
    await start_worker(alert_spo2_duration=4.0, alert_max_gap=2.0)
    # Low for 4 s, but with a 5 s hole: not an unbroken run. Then 4 s unbroken.
    batches = [reading(device, seq, spo2=85) for seq in (0, 1, 6, 7, 8, 9, 10)]
    for batch in batches:
        await add_readings(redis, keys, [batch])
        await eventually(lambda: persisted(redis, keys))
        if batch["seq"] == 9:
            before = await alerts_of(settings.database_url, device)

    after = await alerts_of(settings.database_url, device)
    assert before == []
    assert [(rule, is_open) for rule, is_open, _, _ in after] == [("spo2_low", True)]
    assert after[0][2].timestamp() * 1000 == BASE_TS + 6000


async def test_a_silent_device_gets_one_silence_alert_until_data_arrives(
    start_worker: StartWorker,
    redis: Redis,
    keys: Keys,
    settings: ServiceSettings,
    make_device: DeviceFactory,
) -> None:
    device = (await make_device()).device_id
    await start_worker(alert_silence_after=0.3)
    await add_readings(redis, keys, [reading(device, 0)])

    async def silence_alerts() -> list[tuple[Any, ...]]:
        rows = await alerts_of(settings.database_url, device)
        return [row for row in rows if row[0] == "silence"]

    async def opened() -> bool:
        return len(await silence_alerts()) == 1

    await eventually(opened)
    await asyncio.sleep(0.5)  # several more checks: still the one alert
    while_silent = await silence_alerts()
    await add_readings(redis, keys, [reading(device, 1)])

    async def cleared() -> bool:
        return [is_open for _, is_open, _, _ in await silence_alerts()][:1] == [False]

    await eventually(cleared)
    assert [is_open for _, is_open, _, _ in while_silent] == [True]


def pulse_wave(bpm: float, rate_hz: float, seconds: float, start: float = 0.0) -> list[float]:
    t = start + np.arange(int(rate_hz * seconds)) / rate_hz
    phase = (t * bpm / 60) % 1
    distance = np.minimum(np.abs(phase - 0.2), 1 - np.abs(phase - 0.2))
    wave = np.exp(-0.5 * (distance / 0.07) ** 2) + 0.2 * np.sin(2 * math.pi * 0.25 * t)
    return [round(float(v), 5) for v in 100_000 + 2000 * wave]


async def test_a_device_window_becomes_one_analysis_with_its_heart_rate(
    aiohttp_client: AiohttpClient,
    start_worker: StartWorker,
    redis: Redis,
    keys: Keys,
    settings: ServiceSettings,
) -> None:
    ai = await aiohttp_client(create_analysis_app(for_program(AnalysisSettings, settings)))
    device = "dev-ai-" + keys.prefix.split(":")[1]
    await start_worker(
        ai_service_url=str(ai.make_url("/")), analysis_window=10.0, worker_claim_idle=5.0
    )
    window_start = (BASE_TS // 10_000 + 1) * 10_000
    batches = [
        reading(device, i, ts=window_start + i * 1000, ppg=pulse_wave(75, 50, 1, start=i))
        for i in range(11)  # ten seconds of one window, then the next window begins
    ]
    await add_readings(redis, keys, batches)

    async def analysed() -> list[tuple[Any, ...]]:
        return await query(
            settings.database_url,
            "SELECT status, samples, heart_rate_bpm, hrv_rmssd_ms, attempts, window_start"
            " FROM analyses WHERE device_id = %s",
            device,
        )

    async def done() -> bool:
        return bool(await analysed())

    await eventually(done)
    # The same boundary seen again (a redelivery, another worker) schedules nothing new.
    await add_readings(redis, keys, [batches[-1]])
    await asyncio.sleep(0.3)
    rows = await analysed()
    assert len(rows) == 1
    status, samples, heart_rate, rmssd, attempts, started = rows[0]
    assert (status, samples, attempts) == ("completed", 500, 1)
    assert started.timestamp() * 1000 == window_start
    assert abs(heart_rate - 75) < 2
    assert rmssd is not None
    records = await telemetry_records(redis, keys, settings.pod)
    assert [(r[0], r[3], r[6]) for r in records if r[0] == Kind.ANALYSIS] == [
        (Kind.ANALYSIS, 200, 500)
    ]


async def test_ai_down_retries_then_fails_opens_the_circuit_and_closes_when_it_returns(
    aiohttp_client: AiohttpClient,
    start_worker: StartWorker,
    redis: Redis,
    keys: Keys,
    settings: ServiceSettings,
) -> None:
    calls: list[int] = []
    up = asyncio.Event()

    # The stand-in AI service: down (503) until told otherwise.
    async def analyze(request: web.Request) -> web.Response:
        calls.append(len(calls))
        if not up.is_set():
            return web.json_response({"error": "down"}, status=503)
        return web.json_response({"heart_rate_bpm": 70.0, "hrv_rmssd_ms": 30.0})

    ai_app = web.Application()
    ai_app.router.add_post("/analyze", analyze)
    ai = await aiohttp_client(ai_app)
    device = "dev-down-" + keys.prefix.split(":")[1]
    worker = await start_worker(
        ai_service_url=str(ai.make_url("/")),
        analysis_window=1.0,
        analysis_retries=2,
        analysis_breaker_failures=3,
        analysis_breaker_reset=0.5,
        analysis_concurrency=1,
    )
    runner = worker.app[WORKER].runner
    assert runner is not None
    # Windows 0..5 of one second each: the sixth starting makes five jobs.
    start = (BASE_TS // 1000 + 1) * 1000
    await add_readings(
        redis, keys, [reading(device, i, ts=start + i * 1000, ppg=[1.0] * 50) for i in range(6)]
    )

    async def opened() -> bool:
        # The first job's failure is stored and counted just after its last call opened it.
        return runner.breaker.state == "open" and runner.outcomes["failed"] == 1

    await eventually(opened)
    failed_while_down = runner.outcomes["failed"]
    calls_while_down = len(calls)
    await asyncio.sleep(0.7)  # past the reset: one trial call, which fails, re-opens it
    up.set()

    async def all_done() -> bool:
        return sum(runner.outcomes.values()) == 5

    await eventually(all_done, within=15)
    statuses = await query(
        settings.database_url,
        "SELECT status, attempts FROM analyses WHERE device_id = %s ORDER BY window_start",
        device,
    )
    assert failed_while_down == 1
    assert calls_while_down == 3  # the first job: one call and two retries
    assert runner.breaker.state == "closed"
    assert runner.breaker.opened >= 1
    assert statuses[0] == ("failed", 3)
    assert [s for s, _ in statuses[1:]].count("completed") >= 3
    assert runner.outcomes["completed"] + runner.outcomes["failed"] == 5


async def test_circuit_breaker_opens_after_failures_and_lets_one_trial_through() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset=10.0, clock=lambda: now[0])

    await breaker.acquire()
    breaker.failed()
    await breaker.acquire()
    breaker.failed()
    opened = breaker.state
    now[0] = 10.0
    await breaker.acquire()  # the trial
    second = asyncio.ensure_future(breaker.acquire())
    await asyncio.sleep(0.01)
    waiting_for_trial = not second.done()
    breaker.succeeded()
    await asyncio.wait_for(second, 1)

    assert (opened, waiting_for_trial, breaker.state) == ("open", True, "closed")


async def test_probes_and_heartbeat_describe_the_worker(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    worker = await start_worker()

    async def started() -> bool:
        return (await worker.get("/health/startup")).status == 200

    await eventually(started)
    liveness = await worker.get("/health/liveness")

    async def ready_heartbeat() -> bool:
        raw = await redis.get(keys.heartbeat(settings.pod))
        return raw is not None and decode_heartbeat(cast(bytes, raw)).ready

    await eventually(ready_heartbeat)
    raw = cast(bytes, await redis.get(keys.heartbeat(settings.pod)))
    heartbeat = decode_heartbeat(raw)

    assert liveness.status == 200
    assert (await worker.get("/health/readiness")).status == 200
    assert heartbeat.program == "pulsecal-worker"
    assert isinstance(heartbeat, WorkerHeartbeat)
    assert heartbeat.ready is True
    assert heartbeat.db_pool["size"] >= 1
    # No WebSocket connections: the worker's heartbeat has no such figure (read as 0).
    assert "ws_connections" not in msgspec.json.decode(raw)

    # The database's figures, measured at start and then every 30 s.
    async def measured() -> bool:
        raw = await redis.get(keys.heartbeat(settings.pod))
        beat = decode_heartbeat(cast(bytes, raw))
        return isinstance(beat, WorkerHeartbeat) and beat.postgres is not None

    await eventually(measured)
    beat = decode_heartbeat(cast(bytes, await redis.get(keys.heartbeat(settings.pod))))
    assert isinstance(beat, WorkerHeartbeat)
    assert beat.postgres is not None
    assert beat.postgres.readings_partitions_ahead >= 1
    assert beat.postgres.readings_oldest_day_ms > 0
    assert beat.postgres.database_bytes > 0
    assert sum(beat.postgres.connections.values()) >= 1


async def test_probes_give_anyone_the_status_and_the_operator_the_details(
    start_worker: StartWorker,
) -> None:
    token = uuid.uuid4().hex
    worker = await start_worker(metrics_token=token, environment="production")

    async def started() -> bool:
        return (await worker.get("/health/startup")).status == 200

    await eventually(started)
    anonymous = await worker.get("/health")
    wrong = await worker.get("/health", headers={"Authorization": "Bearer nope"})
    operator = await worker.get("/health", headers={"Authorization": f"Bearer {token}"})

    assert await anonymous.json() == {"status": "ok"}
    assert await wrong.json() == {"status": "ok"}
    assert set(await operator.json()) == {"status", "info", "error", "details"}
    assert "database" in (await operator.json())["details"]
    for response in (anonymous, wrong, operator):
        assert response.headers["Server"] == "pulsecal"


async def test_persist_telemetry_counts_rows_and_samples(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = "dev-tm-" + keys.prefix.split(":")[1]
    await add_readings(redis, keys, [reading(device, seq) for seq in range(12)])
    await start_worker()
    await eventually(lambda: persisted(redis, keys))

    async def counted() -> bool:
        records = await telemetry_records(redis, keys, settings.pod)
        persist = [r for r in records if r[0] == Kind.PERSIST and r[3] == 200]
        return sum(r[5] for r in persist) == 12 and sum(r[6] for r in persist) == 48

    await eventually(counted)


def test_worker_settings_are_in_the_documented_contract() -> None:
    fields = {variable.name: variable.default for variable in variables()}

    assert fields["WORKER_PORT"] == 3002
    assert fields["ADMIN_TOKEN"] is None
    assert fields["ANALYSIS_WINDOW"] == 30.0


async def test_an_unready_ai_service_does_not_stop_persisting(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = "dev-noai-" + keys.prefix.split(":")[1]
    server = TestServer(web.Application())
    await server.start_server()
    url = str(server.make_url("/"))
    await server.close()  # nothing listens there any more
    await start_worker(ai_service_url=url, analysis_window=1.0, analysis_retries=0)
    await add_readings(redis, keys, [reading(device, i, ts=BASE_TS + i * 1000) for i in range(5)])
    await eventually(lambda: persisted(redis, keys))

    assert len(await stored_counts(settings.database_url, [device])) == 5


async def test_batches_the_service_acknowledged_reach_readings_through_the_worker(
    client: Client,
    device: Device,
    start_worker: StartWorker,
    redis: Redis,
    keys: Keys,
    settings: ServiceSettings,
) -> None:
    for seq in range(5):
        body = device.batch(seq, ppg=[1.5, 2.5, 3.5])
        response = await client.post("/ingestion/ppg", json=body, headers=device.headers)
        assert response.status == 202
    await start_worker()
    await eventually(lambda: persisted(redis, keys))

    rows = await query(
        settings.database_url,
        "SELECT seq, ppg, hr, spo2 FROM readings WHERE device_id = %s ORDER BY seq",
        device.device_id,
    )
    assert rows == [(seq, [1.5, 2.5, 3.5], 72.0, 98.0) for seq in range(5)]
