"""Vital alerts from the readings' own times, whatever the grouping; late readings; counters.

The worker is built by its real factory against the real Redis and Postgres, with the
default alert rules (hr above 120 for 60 s, gaps up to 10 s, lateness 5 s).
"""

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, cast

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from loguru import logger
from redis.asyncio import Redis

from shared.keys import Keys
from shared.readings import PERSIST_GROUP
from shared.settings import ServiceSettings, SidecarSettings, WorkerSettings
from shared.telemetry import ALERT_RULES, BATCH_FIELD, Kind, Record, decode_batch
from sidecar.app import create_app as create_sidecar
from tests.support.env import AiohttpClient
from tests.support.sidecar import total
from tests.support.worker import BASE_TS, add_readings, eventually, reading, stored_counts
from tests.support.worker import worker_settings as tuned
from worker.alerts import SILENCE, rules_from
from worker.app import create_app

Client = TestClient[web.Request, web.Application]
StartWorker = Callable[..., Awaitable[Client]]


@pytest.fixture
def start_worker(aiohttp_client: AiohttpClient, settings: ServiceSettings) -> StartWorker:
    async def start(**overrides: Any) -> Client:
        config = tuned(settings, alert_lateness=WorkerSettings().alert_lateness, **overrides)
        return await aiohttp_client(create_app(config))

    return start


def device_of(keys: Keys, name: str) -> str:
    return f"{name}-{keys.prefix.split(':')[1]}"


def the_400_batches(device: str) -> list[dict[str, Any]]:
    """400 one-second batches; seq 100-189 at 190 bpm: 90 s above 120, 60 s needed."""
    return [reading(device, seq, hr=190.0 if 100 <= seq <= 189 else 72.0) for seq in range(400)]


async def persisted(redis: Redis, keys: Keys) -> bool:
    for group in await redis.xinfo_groups(keys.readings):
        if group["name"] == PERSIST_GROUP.encode():
            return bool(group["pending"] == 0 and group["lag"] == 0)
    return False


async def alert_rows(database_url: str, device: str) -> list[tuple[Any, ...]]:
    """(rule, started_at, opened_at, cleared_at) in epoch ms, and the value, oldest first."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT rule, started_at, opened_at, cleared_at, value FROM alerts"
            " WHERE device_id = %s ORDER BY started_at, id",
            (device,),
        )
        rows = await cur.fetchall()

    def ms(t: Any) -> int | None:
        return None if t is None else round(t.timestamp() * 1000)

    return [(rule, ms(s), ms(o), ms(c), value) for rule, s, o, c, value in rows]


async def alert_records(redis: Redis, keys: Keys, pod: str) -> list[tuple[str, str]]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.telemetry(pod)))
    records: list[Record] = [
        r for _, fields in entries for r in decode_batch(fields[BATCH_FIELD]).records
    ]
    return [(r[1], r[2]) for r in records if r[0] == Kind.ALERT]


EPISODE_400 = ("hr_high", BASE_TS + 100_000, BASE_TS + 160_000, BASE_TS + 190_000, 190.0)


async def test_an_episode_inside_one_upload_is_recorded_with_its_readings_times(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = device_of(keys, "upload")
    # Buffered data posted back to back: the worker takes all 400 in one group.
    await add_readings(redis, keys, the_400_batches(device))
    await start_worker()
    await eventually(lambda: persisted(redis, keys))

    stored = await stored_counts(settings.database_url, [device])
    assert len(stored) == 400
    assert await alert_rows(settings.database_url, device) == [EPISODE_400]


async def test_the_same_readings_sent_one_at_a_time_give_the_same_alert(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = device_of(keys, "slow")
    await start_worker(worker_block_ms=20)
    for batch in the_400_batches(device):
        await add_readings(redis, keys, [batch])
        await eventually(lambda: persisted(redis, keys), every=0.005)

    assert await alert_rows(settings.database_url, device) == [EPISODE_400]


async def test_redelivered_readings_open_nothing_again_and_count_each_episode_once(
    start_worker: StartWorker,
    aiohttp_client: AiohttpClient,
    redis: Redis,
    keys: Keys,
    settings: ServiceSettings,
    sidecar_settings: SidecarSettings,
) -> None:
    device = device_of(keys, "again")
    batches = the_400_batches(device)
    await add_readings(redis, keys, batches)
    await start_worker()
    await eventually(lambda: persisted(redis, keys))
    # The same upload stored again (a retry the service took twice, a group committed
    # but not acknowledged): all duplicates.
    await add_readings(redis, keys, batches[50:250])
    await add_readings(redis, keys, batches)
    await eventually(lambda: persisted(redis, keys))
    sidecar = await aiohttp_client(create_sidecar(sidecar_settings))

    async def counted() -> bool:
        response = await sidecar.get("/metrics")
        text = await response.text()
        return total(text, "alerts_created_total", rule="hr_high") == 1 and (
            total(text, "pulsecal_alerts_cleared_total", rule="hr_high") == 1
        )

    await eventually(counted)
    await asyncio.sleep(0.3)  # several telemetry flushes and sidecar reads: nothing more
    text = await (await sidecar.get("/metrics")).text()

    assert await alert_rows(settings.database_url, device) == [EPISODE_400]
    assert await alert_records(redis, keys, settings.pod) == [
        ("hr_high", "open"),
        ("hr_high", "clear"),
    ]
    assert total(text, "alerts_created_total", rule="hr_high") == 1
    assert total(text, "pulsecal_alerts_cleared_total", rule="hr_high") == 1
    assert total(text, "pulsecal_alert_late_readings_total") == 0


async def test_a_reading_later_than_the_bound_is_stored_skipped_by_the_rules_and_counted(
    request: pytest.FixtureRequest,
    start_worker: StartWorker,
    aiohttp_client: AiohttpClient,
    redis: Redis,
    keys: Keys,
    settings: ServiceSettings,
    sidecar_settings: SidecarSettings,
) -> None:
    device = device_of(keys, "late")
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    request.addfinalizer(lambda: logger.remove(sink))
    await start_worker()
    # 100 s at 190 bpm: the alert opens at 60 s, the watermark reaches 95 s.
    await add_readings(redis, keys, [reading(device, seq, hr=190.0) for seq in range(101)])
    await eventually(lambda: persisted(redis, keys))
    # A normal reading from 50.5 s arrives now, 50 s after readings newer than it: had it
    # been in time it would have broken the run at 50.5 s.
    late = reading(device, 1000, ts=BASE_TS + 50_500, hr=72.0)
    # One more in time (within 5 s of the newest), which the rules hold back.
    in_time = reading(device, 1001, ts=BASE_TS + 97_500, hr=72.0)
    await add_readings(redis, keys, [late, in_time])
    await eventually(lambda: persisted(redis, keys))
    sidecar = await aiohttp_client(create_sidecar(sidecar_settings))

    async def late_counted() -> bool:
        text = await (await sidecar.get("/metrics")).text()
        return total(text, "pulsecal_alert_late_readings_total") == 1

    await eventually(late_counted)
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        cur = await conn.execute(
            "SELECT late, evaluated_ts, newest_ts FROM alert_state WHERE device_id = %s",
            (device,),
        )
        state = await cur.fetchone()

    assert len(await stored_counts(settings.database_url, [device])) == 103
    assert await alert_rows(settings.database_url, device) == [
        ("hr_high", BASE_TS, BASE_TS + 60_000, None, 190.0)
    ]
    assert state == (1, BASE_TS + 95_000, BASE_TS + 100_000)
    assert ("vitals", "late") in await alert_records(redis, keys, settings.pod)
    assert [m for m in warnings if "lateness bound" in m] == [
        "worker: 1 readings arrived older than their device's lateness bound (ALERT_LATENESS):"
        " stored, not evaluated by the vital alert rules"
    ]


async def test_an_alert_cleared_and_a_new_episode_of_its_rule_in_one_group_are_both_recorded(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = device_of(keys, "twice")
    await start_worker()
    # Low SpO2 for 40 s: the alert opens at 30 s and is still open when the group is stored.
    await add_readings(redis, keys, [reading(device, seq, spo2=85.0) for seq in range(41)])
    await eventually(lambda: persisted(redis, keys))
    # One group: back to normal at 41 s (clearing it), low again from 51 s for 70 s.
    await add_readings(
        redis,
        keys,
        [reading(device, seq, spo2=97.0 if seq <= 50 else 85.0) for seq in range(41, 121)],
    )
    await eventually(lambda: persisted(redis, keys))

    assert await alert_rows(settings.database_url, device) == [
        ("spo2_low", BASE_TS, BASE_TS + 30_000, BASE_TS + 41_000, 85.0),
        ("spo2_low", BASE_TS + 51_000, BASE_TS + 81_000, None, 85.0),
    ]


async def test_worker_restarted_mid_episode_resumes_the_run_where_it_was(
    start_worker: StartWorker, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    device = device_of(keys, "restart")
    batches = the_400_batches(device)
    first = await start_worker()
    await add_readings(redis, keys, batches[:130])  # 30 s into the episode
    await eventually(lambda: persisted(redis, keys))
    await first.close()
    await start_worker()
    await add_readings(redis, keys, batches[130:])
    await eventually(lambda: persisted(redis, keys))

    assert await alert_rows(settings.database_url, device) == [EPISODE_400]


def test_lateness_is_a_setting_of_its_own() -> None:
    fields = {f.metadata["env"]: f.default for f in dataclasses.fields(WorkerSettings)}

    assert fields["ALERT_LATENESS"] == 5.0


def test_the_sidecar_knows_every_rule_the_worker_alerts_on() -> None:
    worker_rules = {rule.name for rule in rules_from(WorkerSettings())} | {SILENCE}

    assert worker_rules == set(ALERT_RULES)
