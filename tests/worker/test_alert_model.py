"""The vital alerts are a function of the readings alone: the real worker against a model.

A small reference model of the rules (thresholds, duration, maximum gap, clearing, lateness)
lives here, written apart from ``worker.alertrules``. Hypothesis feeds the real worker
(the real Redis stream, the real Postgres) random vital streams of one device, in random
groups, reordered within the lateness bound, with redelivered readings, a worker restart
and a worker that dies holding a group; the ``alerts`` table must hold exactly the model's
episodes, and the telemetry one ``open`` (and one ``clear``) record per episode.
"""

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, cast

import msgspec
import psycopg
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from shared.keys import Keys
from shared.readings import PERSIST_GROUP, encode_write
from shared.settings import WorkerSettings
from shared.telemetry import BATCH_FIELD, Kind, decode_batch
from tests.support.env import REDIS_URL
from tests.support.worker import BASE_TS, WRITE_MAX_BATCH, eventually, worker_settings
from worker.app import create_app

# ------------------------------------------------------------------ the reference model


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    vital: str
    above: bool
    threshold: float
    duration_ms: int


# The defaults of ALERT_HR_HIGH/LOW, ALERT_HR_DURATION, ALERT_SPO2_LOW/DURATION,
# ALERT_MAX_GAP and ALERT_LATENESS.
RULES = (
    Rule("hr_high", "hr", True, 120.0, 60_000),
    Rule("hr_low", "hr", False, 40.0, 60_000),
    Rule("spo2_low", "spo2", False, 90.0, 30_000),
)
MAX_GAP_MS = 10_000
LATENESS_MS = 5_000


@dataclasses.dataclass(frozen=True)
class Vitals:
    seq: int
    ts: int
    hr: float | None
    spo2: float | None


@dataclasses.dataclass(frozen=True, order=True)
class Episode:
    rule: str
    started: int
    opened: int
    value: float
    cleared: int | None


def _breaks(rule: Rule, value: float) -> bool:
    return value > rule.threshold if rule.above else value < rule.threshold


def model(readings: Sequence[Vitals]) -> list[Episode]:
    """The episodes of the readings the rules have seen: all but the newest LATENESS.

    For each rule, over its vital's values in time order: a run is a maximal stretch of
    values breaking the threshold, consecutive ones at most MAX_GAP apart; the alert opens
    at the first value of a run at least the duration after its start, and clears at the
    first value after that within the threshold. The next run can only begin after that.
    """
    if not readings:
        return []
    newest = max(r.ts for r in readings)
    seen = sorted(
        (r for r in readings if r.ts <= newest - LATENESS_MS), key=lambda r: (r.ts, r.seq)
    )
    episodes: list[Episode] = []
    for rule in RULES:
        series = [(r.ts, value) for r in seen if (value := getattr(r, rule.vital)) is not None]
        i = 0
        while i < len(series):
            if not _breaks(rule, series[i][1]):
                i += 1
                continue
            start = i
            end = i
            while (
                end + 1 < len(series)
                and _breaks(rule, series[end + 1][1])
                and series[end + 1][0] - series[end][0] <= MAX_GAP_MS
            ):
                end += 1
            opening = next(
                (
                    k
                    for k in range(start, end + 1)
                    if series[k][0] - series[start][0] >= rule.duration_ms
                ),
                None,
            )
            if opening is None:
                i = end + 1
                continue
            clearing = next(
                (k for k in range(opening + 1, len(series)) if not _breaks(rule, series[k][1])),
                None,
            )
            episodes.append(
                Episode(
                    rule.name,
                    series[start][0],
                    series[opening][0],
                    series[opening][1],
                    None if clearing is None else series[clearing][0],
                )
            )
            if clearing is None:
                break
            i = clearing + 1
    return sorted(episodes)


# ------------------------------------------------------------------ scenarios


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One device's readings as they reach the stream, and what happens on the way."""

    arrivals: tuple[Vitals, ...]  # in arrival order
    groups: tuple[int, ...]  # sizes of the consecutive groups the arrivals are sent in
    restart_before: int | None  # the worker is restarted before this group
    dies_holding: int | None  # a worker reads this group and dies before committing it
    redelivered: tuple[int, ...]  # arrivals sent again, after the group holding them


HR_VALUES = (None, 30.0, 39.5, 40.0, 72.0, 120.0, 120.5, 190.0)
SPO2_VALUES = (None, 85.0, 89.5, 90.0, 97.0)
GAPS_S = (1, 1, 1, 2, 5, 10, 11, 30)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    segments = draw(
        st.lists(
            st.tuples(
                st.integers(1, 15) | st.integers(25, 100),  # readings
                st.sampled_from(GAPS_S),  # seconds before the segment
                st.sampled_from((1, 1, 1, 3, 10, 11)),  # seconds between its readings
                st.sampled_from(HR_VALUES),
                st.sampled_from(SPO2_VALUES),
            ),
            min_size=1,
            max_size=6,
        )
    )
    rng = draw(st.randoms(use_true_random=False))
    readings: list[Vitals] = []
    ts = BASE_TS
    for count, gap, step, hr, spo2 in segments:
        ts += gap * 1000
        for i in range(count):
            if i:
                ts += step * 1000
            readings.append(Vitals(len(readings), ts, hr, spo2))
    # Each reading delayed by less than LATENESS: none arrives after one LATENESS newer.
    delays = [rng.randrange(LATENESS_MS) if rng.random() < 0.3 else 0 for _ in readings]
    order = sorted(range(len(readings)), key=lambda i: (readings[i].ts + delays[i], i))
    arrivals = tuple(readings[i] for i in order)
    cuts = sorted(
        rng.sample(range(1, len(arrivals)), min(len(arrivals) - 1, draw(st.integers(0, 10))))
    )
    bounds = [0, *cuts, len(arrivals)]
    groups = tuple(b - a for a, b in itertools.pairwise(bounds))
    restart_before = draw(st.none() | st.integers(1, max(1, len(groups) - 1)))
    dies_holding = draw(st.none() | st.integers(0, len(groups) - 1))
    redelivered = tuple(
        sorted(rng.sample(range(len(arrivals)), min(len(arrivals), draw(st.integers(0, 20)))))
    )
    return Scenario(arrivals, groups, restart_before, dies_holding, redelivered)


def the_400_batches() -> tuple[Vitals, ...]:
    """One device's 400 one-second batches, seq 100-189 at 190 bpm (90 s above 120)."""
    return tuple(
        Vitals(seq, BASE_TS + seq * 1000, 190.0 if 100 <= seq <= 189 else 72.0, 97.0)
        for seq in range(400)
    )


# ------------------------------------------------------------------ the real worker


class Harness:
    """The worker app (its real factory) on one loop, driven from synchronous examples."""

    def __init__(self, runner: asyncio.Runner, config: WorkerSettings) -> None:
        self.runner = runner
        self.config = config
        self.keys = Keys(config.redis_key_prefix)
        self.redis = Redis.from_url(REDIS_URL)
        self.worker: web.AppRunner | None = None
        self.records_after = b"0-0"
        self.alert_records: dict[str, int] = {"open": 0, "clear": 0, "late": 0}

    async def start_worker(self) -> None:
        self.worker = web.AppRunner(create_app(self.config))
        await self.worker.setup()

    async def stop_worker(self) -> None:
        assert self.worker is not None
        await self.worker.cleanup()
        self.worker = None

    async def add(self, batches: Sequence[Vitals], device_id: str) -> None:
        """One group: the batches appended at once, in the service's entry format (up to
        ``WRITE_MAX_BATCH`` to an entry)."""
        bodies: list[tuple[bytes, bytes | None]] = []
        for v in batches:
            body: dict[str, Any] = {
                "device_id": device_id,
                "seq": v.seq,
                "ts": v.ts,
                "rate_hz": 50.0,
                "ppg": [0.5, 0.6],
            }
            if v.hr is not None:
                body["hr"] = v.hr
            if v.spo2 is not None:
                body["spo2"] = v.spo2
            bodies.append((msgspec.json.encode(body), None))
        async with self.redis.pipeline(transaction=True) as pipe:
            for start in range(0, len(bodies), WRITE_MAX_BATCH):
                fields: dict[Any, Any] = encode_write(
                    BASE_TS, bodies[start : start + WRITE_MAX_BATCH]
                )
                pipe.xadd(self.keys.readings, fields)
            await pipe.execute()

    async def persisted(self) -> bool:
        for group in await self.redis.xinfo_groups(self.keys.readings):
            if group["name"] == PERSIST_GROUP.encode():
                return bool(group["pending"] == 0 and group["lag"] == 0)
        return False

    async def send(self, scenario: Scenario, device_id: str) -> None:
        start = 0
        for index, size in enumerate(scenario.groups):
            group = scenario.arrivals[start : start + size]
            again = [scenario.arrivals[i] for i in scenario.redelivered if i < start]
            start += size
            if index == scenario.restart_before:
                await self.stop_worker()
                await self.start_worker()
            if index == scenario.dies_holding:
                # A worker that read the group and was killed before its commit: a
                # consumer with entries pending and no heartbeat.
                await self.stop_worker()
                await self.add(group, device_id)
                await self.redis.xreadgroup(
                    PERSIST_GROUP, "gone:0123abcd", {self.keys.readings: ">"}, count=10_000
                )
                await self.start_worker()
            else:
                await self.add([*group, *again], device_id)
            await eventually(self.persisted, within=30, every=0.01)

    async def alerts(self, device_id: str) -> list[Episode]:
        async with await psycopg.AsyncConnection.connect(self.config.database_url) as conn:
            cur = await conn.execute(
                "SELECT rule, started_at, opened_at, value, cleared_at FROM alerts"
                " WHERE device_id = %s",
                (device_id,),
            )
            rows = await cur.fetchall()

        def ms(t: dt.datetime) -> int:
            return round(t.timestamp() * 1000)

        return sorted(
            Episode(rule, ms(s), ms(o), value, None if c is None else ms(c))
            for rule, s, o, value, c in rows
        )

    async def late_readings(self, device_id: str) -> int:
        async with await psycopg.AsyncConnection.connect(self.config.database_url) as conn:
            cur = await conn.execute(
                "SELECT late FROM alert_state WHERE device_id = %s", (device_id,)
            )
            row = await cur.fetchone()
        return -1 if row is None else int(row[0])

    async def count_alert_records(self) -> dict[str, int]:
        """The worker's ALERT telemetry records so far, by method."""
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self.redis.xrange(
                self.keys.telemetry(self.config.pod), min=b"(" + self.records_after
            ),
        )
        for entry_id, fields in entries:
            self.records_after = entry_id
            for record in decode_batch(fields[BATCH_FIELD]).records:
                if record[0] == Kind.ALERT:
                    self.alert_records[record[2]] = self.alert_records.get(record[2], 0) + 1
        return dict(self.alert_records)

    def run(self, scenario: Scenario) -> tuple[list[Episode], int]:
        device_id = f"model-{uuid.uuid4().hex[:12]}"

        async def go() -> tuple[list[Episode], int]:
            await self.send(scenario, device_id)
            return await self.alerts(device_id), await self.late_readings(device_id)

        return self.runner.run(go())

    def records_become(self, expected: dict[str, int]) -> dict[str, int]:
        async def go() -> dict[str, int]:
            async def counted() -> bool:
                return await self.count_alert_records() == expected

            with contextlib.suppress(TimeoutError):
                await eventually(counted, within=5)
            return await self.count_alert_records()

        return self.runner.run(go())


@pytest.fixture(scope="module")
def harness(migrated: str) -> Iterator[Harness]:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    config = worker_settings(
        WorkerSettings(
            redis_url=REDIS_URL,
            redis_key_prefix=prefix,
            database_url=migrated,
            pod_name=f"model-{uuid.uuid4().hex[:6]}",
            health_check_interval=0.2,
            health_check_timeout_ms=1000,
            telemetry_flush_interval=0.05,
            heartbeat_interval=0.2,
            heartbeat_ttl=2,
            shutdown_timeout=5.0,
        ),
        worker_block_ms=20,
        alert_lateness=WorkerSettings().alert_lateness,
    )
    assert (config.alert_hr_duration, config.alert_max_gap, config.alert_lateness) == (
        RULES[0].duration_ms / 1000,
        MAX_GAP_MS / 1000,
        LATENESS_MS / 1000,
    )
    with asyncio.Runner() as runner:
        harness = Harness(runner, config)
        runner.run(harness.start_worker())
        yield harness

        async def stop() -> None:
            await harness.stop_worker()
            keys = [k async for k in harness.redis.scan_iter(match=f"{prefix}*")]
            if keys:
                await harness.redis.delete(*keys)
            await harness.redis.aclose()

        runner.run(stop())


# ------------------------------------------------------------------ the tests


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
@example(scenario=Scenario(the_400_batches(), (400,), None, None, ()))
@example(scenario=Scenario(the_400_batches(), (130, 270), 1, None, (5, 150, 170)))
def test_the_alerts_are_the_models_episodes_however_the_readings_arrive(
    harness: Harness, scenario: Scenario
) -> None:
    expected = model(scenario.arrivals)
    opened = sum(1 for _ in expected)
    cleared = sum(1 for e in expected if e.cleared is not None)
    before = dict(harness.alert_records)

    stored, late = harness.run(scenario)
    records = harness.records_become(
        {**before, "open": before["open"] + opened, "clear": before["clear"] + cleared}
    )

    assert stored == expected
    assert late == 0
    assert records == {
        **before,
        "open": before["open"] + opened,
        "clear": before["clear"] + cleared,
    }


def test_the_model_opens_and_clears_the_400_batch_episode_at_its_readings_times() -> None:
    episodes = model(the_400_batches())

    assert episodes == [
        Episode("hr_high", BASE_TS + 100_000, BASE_TS + 160_000, 190.0, BASE_TS + 190_000)
    ]
