"""Alert rules on the vitals and on silence; at most one open alert per device and rule.

Vital rules (``hr_high``, ``hr_low``, ``spo2_low``): each device's readings run through the
state machine of ``worker.alertrules`` in the device's time, in the persist transaction
that stores them, with the machine's state (``alert_state``: the newest ``ts``, the
watermark, the readings not yet evaluated, each rule's run and open alert) loaded and saved
in that same transaction. Only the readings the transaction inserted are evaluated, so a
redelivered group (all duplicates) changes nothing, and a worker that restarts resumes
exactly where the last commit left off. The device status upsert, which runs first in the
transaction and takes the devices' rows in ``device_id`` order, serialises workers that
store the same device. Times are the readings' own: ``started_at`` (the run's first
reading), ``opened_at`` (the reading that made the run long enough), ``cleared_at`` (the
first reading back within the threshold); ``recorded_at`` is when the worker wrote the row.

The silence rule opens an alert for a registered, unrevoked device that has sent data before
but nothing for ``ALERT_SILENCE_AFTER`` seconds (by the service's receive time); any new data
clears it. It is checked only while the persist group is caught up, so a worker that is
behind does not take its own backlog for silent devices.
"""

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import psycopg
from loguru import logger
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from shared.settings import AlertRulesSection

from .alertrules import Clearing, DeviceState, Episode, Reading, RuleRun, VitalRule, advance

__all__ = (
    "LATE_METHOD",
    "LATE_ROUTE",
    "SILENCE",
    "AlertChange",
    "AlertEvaluator",
    "Evaluation",
    "SilenceWatcher",
    "VitalRule",
    "rules_from",
    "update_device_status",
)

SILENCE = "silence"
# The telemetry record of a reading stored too late for the vital rules (kind ALERT).
LATE_ROUTE = "vitals"
LATE_METHOD = "late"

Cursor = psycopg.AsyncCursor[TupleRow]
# A row the persist transaction inserted: device_id, seq, ts (epoch ms), hr, spo2, ...
InsertedRow = tuple[Any, ...]


def rules_from(settings: AlertRulesSection) -> tuple[VitalRule, ...]:
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


@dataclass(slots=True)
class Evaluation:
    """What a persist transaction did to the alerts: report it only once it committed."""

    changes: list[AlertChange] = field(default_factory=list)
    # Readings stored at or below their device's watermark: not evaluated by the rules.
    late: int = 0


_UPDATE_DEVICE_STATUS = """
    INSERT INTO device_status AS s (device_id, last_ts, last_received_at, hr, spo2)
    SELECT device_id, to_timestamp(ts_ms / 1000.0), to_timestamp(received_ms / 1000.0), hr, spo2
    FROM (
        SELECT DISTINCT ON (device_id) device_id, ts_ms, received_ms, hr, spo2
        FROM readings_staging ORDER BY device_id, ts_ms DESC
    ) n
    ON CONFLICT (device_id) DO UPDATE SET
        last_received_at = greatest(s.last_received_at, excluded.last_received_at),
        last_ts = greatest(s.last_ts, excluded.last_ts),
        hr = CASE WHEN excluded.last_ts >= s.last_ts THEN excluded.hr ELSE s.hr END,
        spo2 = CASE WHEN excluded.last_ts >= s.last_ts THEN excluded.spo2 ELSE s.spo2 END
"""

# A silence alert clears at any data from the device, by the worker's clock.
_CLEAR_SILENCE = """
    UPDATE alerts SET cleared_at = now()
    WHERE rule = 'silence' AND cleared_at IS NULL
        AND device_id IN (SELECT device_id FROM readings_staging)
    RETURNING id, device_id
"""

_LOAD_STATE = """
    SELECT device_id, newest_ts, evaluated_ts, pending, runs, late
    FROM alert_state WHERE device_id = ANY(%s)
"""

# Devices seen for the first time: alerts opened before they had a state (by an older worker).
_OPEN_VITAL_ALERTS = """
    SELECT device_id, rule, id FROM alerts
    WHERE device_id = ANY(%s) AND rule = ANY(%s) AND cleared_at IS NULL
"""

# The states to save: one JSON document (a list of _StateRow), far cheaper to send than
# six arrays; pending and runs go into their text columns exactly as encoded.
_STATE_ROWS = """
    json_to_recordset(%s::json) AS u(
        device_id text, newest_ts bigint, evaluated_ts bigint, pending json, runs json, late bigint)
"""
_UPDATE_STATE = f"""
    UPDATE alert_state s SET newest_ts = u.newest_ts, evaluated_ts = u.evaluated_ts,
        pending = u.pending::text, runs = u.runs::text, late = u.late
    FROM {_STATE_ROWS} WHERE s.device_id = u.device_id
"""  # noqa: S608 - the interpolated text is a constant of this module, not input
_INSERT_STATE = f"""
    INSERT INTO alert_state (device_id, newest_ts, evaluated_ts, pending, runs, late)
    SELECT u.device_id, u.newest_ts, u.evaluated_ts, u.pending::text, u.runs::text, u.late
    FROM {_STATE_ROWS}
"""  # noqa: S608 - the interpolated text is a constant of this module, not input


class _StateRow(msgspec.Struct):
    device_id: str
    newest_ts: int | None
    evaluated_ts: int | None
    pending: msgspec.Raw
    runs: msgspec.Raw
    late: int


_state_rows_encoder = msgspec.json.Encoder()

_NEW_IDS = "SELECT nextval(pg_get_serial_sequence('alerts', 'id')) FROM generate_series(1, %s)"

_INSERT_ALERTS = """
    INSERT INTO alerts (id, device_id, rule, metric, above, threshold, value, message,
        started_at, opened_at, cleared_at, cleared_value)
    SELECT * FROM unnest(
        %s::bigint[], %s::text[], %s::text[], %s::text[], %s::bool[], %s::float8[],
        %s::float8[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::timestamptz[],
        %s::float8[])
    ON CONFLICT (device_id, rule) WHERE cleared_at IS NULL DO NOTHING
    RETURNING id
"""

_OPEN_ALERT = "SELECT id FROM alerts WHERE device_id = %s AND rule = %s AND cleared_at IS NULL"

_CLEAR_ALERTS = """
    UPDATE alerts a SET cleared_at = c.at, cleared_value = c.value
    FROM unnest(%s::bigint[], %s::timestamptz[], %s::float8[]) AS c(id, at, value)
    WHERE a.id = c.id AND a.cleared_at IS NULL
    RETURNING a.id
"""


async def update_device_status(cur: Cursor) -> None:
    """Each device's newest reading, from the group in ``readings_staging``."""
    await cur.execute(_UPDATE_DEVICE_STATUS)


def _time(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _cleared_message(rule: VitalRule, value: float) -> str:
    return f"{rule.metric} back within {rule.threshold:g} (now {value:g})"


class AlertEvaluator:
    """The vital rules, run inside the persist transaction once the group is inserted."""

    def __init__(self, rules: Sequence[VitalRule], *, max_gap: float, lateness: float) -> None:
        self._rules = tuple(rules)
        self._names = [rule.name for rule in rules]
        self._max_gap_ms = max_gap * 1000
        self._lateness_ms = round(lateness * 1000)

    async def evaluate(self, cur: Cursor, inserted: Sequence[InsertedRow]) -> Evaluation:
        """Clear silence alerts; run the vital rules over the readings ``inserted`` now."""
        out = Evaluation()
        await cur.execute(_CLEAR_SILENCE)
        for alert_id, device_id in await cur.fetchall():
            out.changes.append(
                AlertChange(alert_id, device_id, SILENCE, "clear", None, "data arrived")
            )
        if not inserted or not self._rules:
            return out
        by_device: dict[str, list[Reading]] = {}
        for row in inserted:
            by_device.setdefault(row[0], []).append((row[2], row[1], row[3], row[4]))
        states, new = await self._load(cur, list(by_device))
        events: list[Episode | Clearing] = []
        for device_id, readings in by_device.items():
            advanced = advance(
                device_id,
                states[device_id],
                readings,
                self._rules,
                max_gap_ms=self._max_gap_ms,
                lateness_ms=self._lateness_ms,
            )
            events.extend(advanced.events)
            out.late += advanced.late
        if events:
            out.changes.extend(await self._record(cur, events))
        if len(new) < len(states):
            await self._save(cur, _UPDATE_STATE, states, lambda device: device not in new)
        if new:
            await self._save(cur, _INSERT_STATE, states, new.__contains__)
        return out

    async def _load(
        self, cur: Cursor, devices: list[str]
    ) -> tuple[dict[str, DeviceState], set[str]]:
        """The devices' states, and which of them are new (no state stored yet)."""
        await cur.execute(_LOAD_STATE, (devices,))
        states = {row[0]: DeviceState.decode(*row[1:]) for row in await cur.fetchall()}
        new = {device for device in devices if device not in states}
        if new:
            for device in new:
                states[device] = DeviceState()
            await cur.execute(_OPEN_VITAL_ALERTS, (list(new), self._names))
            for device_id, rule, alert_id in await cur.fetchall():
                states[device_id].runs[rule] = RuleRun(open=alert_id)
        return states, new

    @staticmethod
    async def _save(
        cur: Cursor, sql: str, states: dict[str, DeviceState], which: Callable[[str], bool]
    ) -> None:
        rows = [
            _StateRow(
                device_id,
                state.newest,
                state.evaluated,
                msgspec.Raw(state.encode_pending()),
                msgspec.Raw(state.encode_runs()),
                state.late,
            )
            for device_id, state in states.items()
            if which(device_id)
        ]
        await cur.execute(sql, (_state_rows_encoder.encode(rows).decode(),))

    async def _record(self, cur: Cursor, events: list[Episode | Clearing]) -> list[AlertChange]:
        """Insert the episodes, clear the alerts cleared; the changes in the order they happened."""
        # Clearings first: an alert cleared here may be open in the table still, and the one
        # open alert per device and rule would make a new episode of its rule conflict with it.
        clearings = [e for e in events if isinstance(e, Clearing)]
        cleared: set[int] = set()
        if clearings:
            await cur.execute(
                _CLEAR_ALERTS,
                (
                    [c.alert_id for c in clearings],
                    [_time(c.cleared) for c in clearings],
                    [c.value for c in clearings],
                ),
            )
            cleared = {row[0] for row in await cur.fetchall()}
        episodes = [e for e in events if isinstance(e, Episode)]
        new = await self._insert(cur, episodes) if episodes else []
        changes: list[AlertChange] = []
        for event in events:
            device_id, rule = event.device_id, event.rule.name
            if isinstance(event, Clearing):
                if event.alert_id in cleared:
                    message = _cleared_message(event.rule, event.value)
                    changes.append(
                        AlertChange(event.alert_id, device_id, rule, "clear", event.value, message)
                    )
            elif event.alert_id is not None and event in new:
                message = event.rule.describe(event.value)
                changes.append(
                    AlertChange(event.alert_id, device_id, rule, "open", event.value, message)
                )
                if event.cleared_value is not None:
                    value = event.cleared_value
                    message = _cleared_message(event.rule, value)
                    changes.append(
                        AlertChange(event.alert_id, device_id, rule, "clear", value, message)
                    )
        return changes

    async def _insert(self, cur: Cursor, episodes: list[Episode]) -> list[Episode]:
        """Each episode's alert, its id set; those that are new alerts."""
        await cur.execute(_NEW_IDS, (len(episodes),))
        ids = [row[0] for row in await cur.fetchall()]
        columns: tuple[list[Any], ...] = tuple([] for _ in range(12))
        for alert_id, e in zip(ids, episodes, strict=True):
            rule = e.rule
            row = (
                alert_id,
                e.device_id,
                rule.name,
                rule.metric,
                rule.above,
                rule.threshold,
                e.value,
                rule.describe(e.value),
                _time(e.started),
                _time(e.opened),
                None if e.cleared is None else _time(e.cleared),
                e.cleared_value,
            )
            for column, cell in zip(columns, row, strict=True):
                column.append(cell)
        await cur.execute(_INSERT_ALERTS, columns)
        inserted = {row[0] for row in await cur.fetchall()}
        new: list[Episode] = []
        for alert_id, e in zip(ids, episodes, strict=True):
            if alert_id in inserted:
                e.alert_id = alert_id
                new.append(e)
                continue
            # Still open, and an alert for its rule was open already (opened by a worker of
            # an older version during a rolling upgrade): the machine keeps to that one.
            await cur.execute(_OPEN_ALERT, (e.device_id, e.rule.name))
            found = await cur.fetchone()
            e.alert_id = None if found is None else found[0]
        return new


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
