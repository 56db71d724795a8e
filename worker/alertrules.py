"""The vital alert rules as a state machine over one device's readings, in the device's time.

A device's readings are evaluated in ``(ts, seq)`` order, whatever order and grouping they
arrive in, as long as none arrives after a reading ``lateness`` or more newer than it: the
machine holds back the readings of the last ``lateness`` (``pending``) and evaluates a
reading once the device's newest ``ts`` is at least ``lateness`` past it (the watermark,
``evaluated``). A reading at or below the watermark when it arrives is late: stored by the
worker, skipped by the rules, and counted.

Per rule: a run is the unbroken sequence of readings with the rule's vital that break its
threshold, no two further apart than ``max_gap`` (readings without the vital are skipped).
An alert opens at the reading that makes the run ``duration`` long (``started`` = the run's
first reading, ``opened`` = this one, ``value`` = its value) and clears at the next reading
with the vital back inside the threshold. At most one alert per rule is open; while one is,
gaps change nothing.

Pure: no I/O. ``worker.alerts`` loads the state from Postgres and stores what it returns,
in the transaction that stores the readings.
"""

from dataclasses import dataclass, field
from typing import Literal

import msgspec

__all__ = (
    "Clearing",
    "DeviceState",
    "Episode",
    "Reading",
    "RuleRun",
    "VitalRule",
    "advance",
)

# ts (epoch ms, the device's clock), seq, hr, spo2
Reading = tuple[int, int, float | None, float | None]
_VITAL_INDEX = {"hr": 2, "spo2": 3}


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


@dataclass(slots=True, eq=False)
class Episode:
    """An alert opened while advancing (and perhaps cleared too); its id once inserted."""

    device_id: str
    rule: VitalRule
    started: int
    opened: int
    value: float
    cleared: int | None = None
    cleared_value: float | None = None
    alert_id: int | None = None


@dataclass(frozen=True, slots=True)
class Clearing:
    """An alert opened before this advance, cleared by one of its readings."""

    device_id: str
    rule: VitalRule
    alert_id: int
    cleared: int
    value: float


@dataclass(slots=True)
class RuleRun:
    start: int | None = None  # the run's first reading
    last: int | None = None  # the last reading with the rule's vital
    open: int | Episode | None = None  # the open alert's id, or the episode opened now


class _Saved(msgspec.Struct, array_like=True):
    start: int | None
    last: int | None
    open: int | None


_pending_codec = msgspec.json.Decoder(list[tuple[int, int, float | None, float | None]])
_runs_codec = msgspec.json.Decoder(dict[str, _Saved])
_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class DeviceState:
    newest: int | None = None  # the newest reading's ts
    evaluated: int | None = None  # the watermark: readings at or before it are done
    pending: list[Reading] = field(default_factory=list)
    runs: dict[str, RuleRun] = field(default_factory=dict)
    late: int = 0

    @classmethod
    def decode(
        cls, newest: int, evaluated: int, pending: bytes | str, runs: bytes | str, late: int
    ) -> "DeviceState":
        return cls(
            newest,
            evaluated,
            list(_pending_codec.decode(pending)),
            {
                name: RuleRun(saved.start, saved.last, saved.open)
                for name, saved in _runs_codec.decode(runs).items()
            },
            late,
        )

    def encode_pending(self) -> bytes:
        return _encoder.encode(self.pending)

    def encode_runs(self) -> bytes:
        saved: dict[str, _Saved] = {}
        for name, run in self.runs.items():
            open_id = run.open.alert_id if isinstance(run.open, Episode) else run.open
            if run.start is None and run.last is None and open_id is None:
                continue
            saved[name] = _Saved(run.start, run.last, open_id)
        return _encoder.encode(saved)


@dataclass(slots=True)
class Advance:
    """What one advance did, in the order it happened."""

    events: list[Episode | Clearing] = field(default_factory=list)
    late: int = 0


def advance(
    device_id: str,
    state: DeviceState,
    readings: list[Reading],
    rules: tuple[VitalRule, ...],
    *,
    max_gap_ms: float,
    lateness_ms: int,
) -> Advance:
    """Take the device's newly stored readings (any order) into ``state``; what happened."""
    out = Advance()
    watermark = state.evaluated
    fresh = readings
    if watermark is not None:
        fresh = [r for r in readings if r[0] > watermark]
        out.late = len(readings) - len(fresh)
        state.late += out.late
    if not fresh:
        return out
    newest = max(r[0] for r in fresh)
    if state.newest is None or newest > state.newest:
        state.newest = newest
    assert state.newest is not None
    now = state.newest - lateness_ms
    if watermark is not None and now < watermark:
        now = watermark
    state.evaluated = now
    pending = sorted(state.pending + fresh if state.pending else fresh, key=_order)
    cut = len(pending)
    while cut and pending[cut - 1][0] > now:
        cut -= 1
    state.pending = pending[cut:]
    if not cut:
        return out
    for rule in rules:
        run = state.runs.get(rule.name)
        if run is None:
            run = state.runs[rule.name] = RuleRun()
        _run_rule(device_id, rule, run, pending[:cut], max_gap_ms, out.events)
    if len(rules) > 1 and out.events:
        # Each rule's events are in time order; the rules' interleaved by time.
        out.events.sort(key=_event_time)
    return out


def _order(reading: Reading) -> tuple[int, int]:
    return reading[0], reading[1]


def _event_time(event: Episode | Clearing) -> int:
    if isinstance(event, Clearing):
        return event.cleared
    return event.opened


def _run_rule(
    device_id: str,
    rule: VitalRule,
    run: RuleRun,
    readings: list[Reading],
    max_gap_ms: float,
    events: list[Episode | Clearing],
) -> None:
    index = _VITAL_INDEX[rule.metric]
    duration_ms = rule.duration * 1000
    threshold = rule.threshold
    above = rule.above
    for reading in readings:
        value = reading[index]
        if value is None:
            continue
        ts = reading[0]
        broken = value > threshold if above else value < threshold
        if run.open is not None:
            if not broken:
                if isinstance(run.open, Episode):
                    run.open.cleared = ts
                    run.open.cleared_value = value
                else:
                    events.append(Clearing(device_id, rule, run.open, ts, value))
                run.open = None
                run.start = None
            run.last = ts
            continue
        if not broken:
            run.start = None
            run.last = ts
            continue
        start = run.start
        if start is None or (run.last is not None and ts - run.last > max_gap_ms):
            start = run.start = ts
        run.last = ts
        if ts - start >= duration_ms:
            episode = Episode(device_id, rule, start, ts, value)
            run.open = episode
            events.append(episode)
