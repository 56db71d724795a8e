"""Alert rules on the vitals and on silence; at most one open alert per device and rule.

Vital rules (``hr_high``, ``hr_low``, ``spo2_low``) are evaluated by the persist worker inside
the transaction that stores the readings they are based on, so a redelivered group evaluates
them again and the partial unique index ``alerts_open (device_id, rule) WHERE cleared_at IS
NULL`` makes that idempotent, whichever worker does it. A rule opens an alert when the
device's newest reading breaks the threshold and every reading with that vital over the last
``duration`` seconds broke it too, with no gap in the data longer than ``ALERT_MAX_GAP``. The
alert clears at the device's first newer reading back inside the threshold.

The silence rule opens an alert for a registered, unrevoked device that has sent data before
but nothing for ``ALERT_SILENCE_AFTER`` seconds (by the service's receive time); any new data
clears it. It is checked only while the persist group is caught up, so a worker that is
behind does not take its own backlog for silent devices.
"""

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from loguru import logger
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from shared.settings import Settings

__all__ = (
    "SILENCE",
    "AlertChange",
    "AlertEvaluator",
    "SilenceWatcher",
    "VitalRule",
    "count_open_alerts",
    "list_alerts",
    "rules_from",
    "update_device_status",
)

SILENCE = "silence"

Cursor = psycopg.AsyncCursor[TupleRow]


@dataclass(frozen=True, slots=True)
class VitalRule:
    name: str
    metric: Literal["hr", "spo2"]
    above: bool
    threshold: float
    duration: float  # seconds

    def broken_by(self, value: float) -> bool:
        return value > self.threshold if self.above else value < self.threshold

    def describe(self, value: float | None) -> str:
        unit = " bpm" if self.metric == "hr" else " %"
        side = "above" if self.above else "below"
        shown = "?" if value is None else f"{value:g}{unit}"
        return (
            f"{self.metric} {side} {self.threshold:g}{unit} for {self.duration:g} s (now {shown})"
        )


def rules_from(settings: Settings) -> tuple[VitalRule, ...]:
    return (
        VitalRule("hr_high", "hr", True, settings.alert_hr_high, settings.alert_hr_duration),
        VitalRule("hr_low", "hr", False, settings.alert_hr_low, settings.alert_hr_duration),
        VitalRule("spo2_low", "spo2", False, settings.alert_spo2_low, settings.alert_spo2_duration),
    )


@dataclass(frozen=True, slots=True)
class AlertChange:
    alert_id: int
    device_id: str
    rule: str
    action: Literal["open", "clear"]
    value: float | None
    message: str

    def log(self) -> None:
        bound = logger.bind(deviceId=self.device_id, rule=self.rule, alertId=self.alert_id)
        if self.action == "open":
            bound.warning("alert opened for {}: {}", self.device_id, self.message)
        else:
            bound.info("alert cleared for {} ({}): {}", self.device_id, self.rule, self.message)


# The newest reading of each device in the group being persisted (readings_staging).
_NEWEST = """
    SELECT DISTINCT ON (device_id) device_id, ts_ms, received_ms, hr, spo2
    FROM readings_staging ORDER BY device_id, ts_ms DESC
"""

_UPDATE_DEVICE_STATUS = f"""
    INSERT INTO device_status AS s (device_id, last_ts, last_received_at, hr, spo2)
    SELECT device_id, to_timestamp(ts_ms / 1000.0), to_timestamp(received_ms / 1000.0), hr, spo2
    FROM ({_NEWEST}) n
    ON CONFLICT (device_id) DO UPDATE SET
        last_received_at = greatest(s.last_received_at, excluded.last_received_at),
        last_ts = greatest(s.last_ts, excluded.last_ts),
        hr = CASE WHEN excluded.last_ts >= s.last_ts THEN excluded.hr ELSE s.hr END,
        spo2 = CASE WHEN excluded.last_ts >= s.last_ts THEN excluded.spo2 ELSE s.spo2 END
"""  # noqa: S608 - the interpolated text is a constant of this module, not input

# A vital alert clears at the device's newest reading back inside its threshold (the one
# stored with the alert); a silence alert at any data at all.
_CLEAR = f"""
    WITH newest AS ({_NEWEST})
    UPDATE alerts a SET
        cleared_at = now(),
        cleared_value = CASE a.metric WHEN 'hr' THEN n.hr WHEN 'spo2' THEN n.spo2 END
    FROM newest n JOIN device_status s ON s.device_id = n.device_id
    WHERE a.cleared_at IS NULL AND a.device_id = n.device_id AND (
        a.rule = 'silence'
        OR (
            to_timestamp(n.ts_ms / 1000.0) >= s.last_ts
            AND CASE a.metric WHEN 'hr' THEN n.hr WHEN 'spo2' THEN n.spo2 END IS NOT NULL
            AND NOT CASE WHEN a.above
                THEN CASE a.metric WHEN 'hr' THEN n.hr ELSE n.spo2 END > a.threshold
                ELSE CASE a.metric WHEN 'hr' THEN n.hr ELSE n.spo2 END < a.threshold
            END
        )
    )
    RETURNING a.id, a.device_id, a.rule, a.cleared_value
"""  # noqa: S608 - the interpolated text is a constant of this module, not input

# Devices whose newest reading (newest of all stored, not only of this group) breaks a rule
# that has no open alert yet, with their readings over the rule's duration and the gap.
# The candidates are materialized first: only they may cost a look at their readings.
_CANDIDATES = f"""
    WITH rules (rule, metric, above, threshold, duration_s) AS (
        SELECT * FROM unnest(
            %(rule)s::text[], %(metric)s::text[], %(above)s::bool[],
            %(threshold)s::float8[], %(duration)s::float8[])
    ), newest AS ({_NEWEST}), candidates AS MATERIALIZED (
        SELECT n.device_id, to_timestamp(n.ts_ms / 1000.0) AS ts, r.rule, r.metric,
            r.duration_s
        FROM newest n
        JOIN device_status s
            ON s.device_id = n.device_id AND s.last_ts = to_timestamp(n.ts_ms / 1000.0)
        CROSS JOIN rules r
        WHERE CASE WHEN r.above
                THEN CASE r.metric WHEN 'hr' THEN n.hr ELSE n.spo2 END > r.threshold
                ELSE CASE r.metric WHEN 'hr' THEN n.hr ELSE n.spo2 END < r.threshold
            END
            AND NOT EXISTS (
                SELECT 1 FROM alerts a
                WHERE a.device_id = n.device_id AND a.rule = r.rule AND a.cleared_at IS NULL)
    )
    SELECT c.device_id, c.rule, rd.ts, CASE c.metric WHEN 'hr' THEN rd.hr ELSE rd.spo2 END
    FROM candidates c
    JOIN readings rd ON rd.device_id = c.device_id
        AND rd.ts >= c.ts - make_interval(secs => c.duration_s + %(gap)s)
        AND rd.ts <= c.ts
    ORDER BY c.device_id, c.rule, rd.ts
"""  # noqa: S608 - the interpolated text is a constant of this module, not input

_OPEN = """
    INSERT INTO alerts (device_id, rule, metric, above, threshold, value, message, started_at)
    SELECT * FROM unnest(
        %s::text[], %s::text[], %s::text[], %s::bool[], %s::float8[], %s::float8[],
        %s::text[], %s::timestamptz[])
    ON CONFLICT (device_id, rule) WHERE cleared_at IS NULL DO NOTHING
    RETURNING id, device_id, rule, value, message
"""


async def update_device_status(cur: Cursor) -> None:
    """Each device's newest reading, from the group in ``readings_staging``."""
    await cur.execute(_UPDATE_DEVICE_STATUS)


class AlertEvaluator:
    """The vital rules, run inside the persist transaction once the group is inserted."""

    def __init__(self, rules: Sequence[VitalRule], *, max_gap: float) -> None:
        self._rules = {rule.name: rule for rule in rules}
        self._max_gap = dt.timedelta(seconds=max_gap)
        self._params: dict[str, Any] = {
            "rule": [r.name for r in rules],
            "metric": [r.metric for r in rules],
            "above": [r.above for r in rules],
            "threshold": [r.threshold for r in rules],
            "duration": [r.duration for r in rules],
            "gap": max_gap,
        }

    async def evaluate(self, cur: Cursor) -> list[AlertChange]:
        changes: list[AlertChange] = []
        await cur.execute(_CLEAR)
        for alert_id, device_id, rule_name, value in await cur.fetchall():
            rule = self._rules.get(rule_name)
            if rule_name == SILENCE:
                message = "data arrived"
            elif rule is None:
                message = "back within the threshold"
            else:
                message = f"{rule.metric} back within {rule.threshold:g} (now {value:g})"
            changes.append(AlertChange(alert_id, device_id, rule_name, "clear", value, message))
        if not self._rules:
            return changes
        await cur.execute(_CANDIDATES, self._params)
        rows = await cur.fetchall()
        if rows:
            changes.extend(await self._open(cur, rows))
        return changes

    def _streak_start(
        self, rule: VitalRule, readings: list[tuple[dt.datetime, float | None]]
    ) -> dt.datetime | None:
        """When the unbroken run of readings that break ``rule`` began (None: no run)."""
        start: dt.datetime | None = None
        previous: dt.datetime | None = None
        for ts, value in readings:
            if value is None:
                continue
            if not rule.broken_by(value) or (
                previous is not None and ts - previous > self._max_gap
            ):
                start = None
            if rule.broken_by(value) and start is None:
                start = ts
            previous = ts
        return start

    async def _open(
        self, cur: Cursor, rows: list[tuple[str, str, dt.datetime, float | None]]
    ) -> list[AlertChange]:
        by_candidate: dict[tuple[str, str], list[tuple[dt.datetime, float | None]]] = {}
        for device_id, rule_name, ts, value in rows:
            by_candidate.setdefault((device_id, rule_name), []).append((ts, value))
        columns: list[list[Any]] = [[] for _ in range(8)]
        for (device_id, rule_name), readings in by_candidate.items():
            rule = self._rules[rule_name]
            start = self._streak_start(rule, readings)
            newest_ts, newest_value = readings[-1]
            if start is None or newest_value is None:
                continue
            if (newest_ts - start).total_seconds() < rule.duration:
                continue
            row = (
                device_id,
                rule.name,
                rule.metric,
                rule.above,
                rule.threshold,
                newest_value,
                rule.describe(newest_value),
                start,
            )
            for column, cell in zip(columns, row, strict=True):
                column.append(cell)
        if not columns[0]:
            return []
        await cur.execute(_OPEN, columns)
        return [
            AlertChange(alert_id, device_id, rule_name, "open", value, message)
            for alert_id, device_id, rule_name, value, message in await cur.fetchall()
        ]


_OPEN_SILENCE = """
    INSERT INTO alerts (device_id, rule, metric, above, threshold, value, message, started_at)
    SELECT s.device_id, 'silence', 'silence', true, %(after)s,
        round(extract(epoch FROM now() - s.last_received_at)),
        'no data for ' || round(extract(epoch FROM now() - s.last_received_at))::text
            || ' s (limit ' || %(after)s::text || ' s)',
        s.last_received_at
    FROM device_status s JOIN devices d ON d.device_id = s.device_id
    WHERE d.revoked_at IS NULL
        AND s.last_received_at < now() - make_interval(secs => %(after)s)
    ON CONFLICT (device_id, rule) WHERE cleared_at IS NULL DO NOTHING
    RETURNING id, device_id, value, message
"""


class SilenceWatcher:
    """Opens silence alerts; data arriving clears them (in the persist transaction)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        after: float,
        caught_up: Callable[[], bool],
        on_change: Callable[[AlertChange], None],
    ) -> None:
        self._pool = pool
        self._after = after
        self._caught_up = caught_up
        self._on_change = on_change
        self.interval = min(max(after / 4, 0.05), 10.0)

    async def check_once(self) -> list[AlertChange]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(_OPEN_SILENCE, {"after": self._after})
            rows = await cur.fetchall()
        return [
            AlertChange(alert_id, device_id, SILENCE, "open", value, message)
            for alert_id, device_id, value, message in rows
        ]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self._caught_up():
                continue
            try:
                changes = await self.check_once()
            except (psycopg.Error, OSError) as e:
                logger.debug("silence check skipped: {}", e)
                continue
            for change in changes:
                self._on_change(change)


async def count_open_alerts(pool: AsyncConnectionPool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM alerts WHERE cleared_at IS NULL")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


_LIST = """
    SELECT id, device_id, rule, metric, above, threshold, value, message, started_at,
        opened_at, cleared_at, cleared_value
    FROM alerts
    WHERE opened_at >= %(since)s
        AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
        AND (NOT %(open_only)s OR cleared_at IS NULL)
    ORDER BY opened_at DESC, id DESC
    LIMIT %(limit)s
"""


async def list_alerts(
    conn: psycopg.AsyncConnection[TupleRow],
    *,
    since: dt.datetime,
    device_id: str | None,
    open_only: bool,
    limit: int,
) -> list[dict[str, Any]]:
    cur = await conn.execute(
        _LIST, {"since": since, "device_id": device_id, "open_only": open_only, "limit": limit}
    )
    out: list[dict[str, Any]] = []
    for row in await cur.fetchall():
        (alert_id, device, rule, metric, above, threshold, value, message, started_at) = row[:9]
        opened_at, cleared_at, cleared_value = row[9:]
        out.append(
            {
                "id": alert_id,
                "device_id": device,
                "rule": rule,
                "metric": metric,
                "condition": ("above" if above else "below"),
                "threshold": threshold,
                "value": value,
                "message": message,
                "open": cleared_at is None,
                "started_at": started_at,
                "opened_at": opened_at,
                "cleared_at": cleared_at,
                "cleared_value": cleared_value,
            }
        )
    return out
