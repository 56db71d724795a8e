"""The metric state built from telemetry records: plain dicts, lists and ``bisect``.

prometheus_client's children cost microseconds per observation; a dict lookup, a bisect and
a few list increments cost a fraction of that (BENCHMARKS.md, "Sidecar"). ``exposition.py``
renders this state; ``consumer.py`` saves it together with the stream position it matches,
so a restarted sidecar goes on from totals that agree with where it resumes reading.
"""

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from shared.telemetry import Kind, TelemetryBatch

__all__ = (
    "DURATION_BUCKETS_S",
    "OVERFLOW",
    "WINDOW_BUCKETS",
    "WINDOW_SECONDS",
    "Aggregator",
    "Exemplar",
    "HttpKey",
    "WindowPoint",
    "percentile_from_buckets",
)

# Upper bounds of http_request_duration_seconds. The lean ingest path answers in well under
# a millisecond when healthy, so the low end is finer than prometheus_client's defaults.
DURATION_BUCKETS_S = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BOUNDS_US = [round(b * 1_000_000) for b in DURATION_BUCKETS_S]
_NB = len(_BOUNDS_US) + 1  # the finite buckets and +Inf
_SUM = _NB  # index of the duration sum (µs) in a series' list
_E4XX = _NB  # indexes in a window bucket's list: 4xx, 5xx, WebSocket messages
_E5XX = _NB + 1
_WSMSG = _NB + 2

OVERFLOW = "__overflow__"
# Most recent service instances whose cumulative drop counts are kept apart; older ones are
# folded into one total, so a service restarting for ever does not grow the state.
_BOOTS_KEPT = 16
# WebSocket close codes are 1000-4999; anything else is one label value.
_CLOSE_CODES = range(1000, 5000)
_OTHER_CODE = 0
_STATUSES = range(100, 600)
# Record kinds that are only counted, by (kind, route, method, status).
_EVENT_KINDS = frozenset(
    {
        Kind.RATE_LIMITED,
        Kind.ALERT,
        Kind.ANALYSIS,
        Kind.PERSIST,
        Kind.DEAD_LETTER,
        Kind.PROTOCOL_ERROR,
    }
)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "OTHER"})

# The dashboard's window: 90 buckets of 10 s, keyed by when the service sent the batch.
WINDOW_SECONDS = 10
WINDOW_BUCKETS = 90

_STATE_VERSION = 1

# route, method, status: the order of the record's fields 1..3.
HttpKey = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class Exemplar:
    trace_id: str
    value_s: float
    timestamp_s: float


@dataclass(frozen=True, slots=True)
class WindowPoint:
    start_s: int
    requests: int
    errors_4xx: int
    errors_5xx: int
    ws_messages: int
    p95_s: float | None


class _Saved(msgspec.Struct, kw_only=True):
    """What is kept in Redis: the position and every total that must survive a restart."""

    version: int
    last_id: str
    entries_read: int
    bounds_us: list[int]
    http: list[tuple[str, str, int, list[int]]]
    ws_messages: list[tuple[int, int]]
    ws_closes: list[tuple[int, int]]
    ws_opens: int
    samples: dict[str, int]
    bytes_in: dict[str, int]
    records: int
    entries: int
    decode_errors: int
    unknown_records: int
    gap_entries: int
    stream_resets: int
    overflow: dict[str, int]
    dropped_boots: list[tuple[str, int]]
    dropped_retired: int
    window: list[tuple[int, list[int]]]
    events: list[tuple[int, str, str, int, int]] = []


_saved_encoder = msgspec.msgpack.Encoder()
_saved_decoder = msgspec.msgpack.Decoder(_Saved)


def _counts() -> dict[str, int]:
    return {"http": 0, "ws": 0}


@dataclass(slots=True, eq=False)
class Aggregator:
    """Totals since the first record the sidecar of this pod ever read, and where it is."""

    max_series: int
    # Stream position: the last entry consumed and how many entries precede it (inclusive)
    # in the stream's history, which is what tells trimmed-away entries apart.
    last_id: str = "0-0"
    entries_read: int = 0
    http: dict[HttpKey, list[int]] = field(default_factory=dict)
    ws_messages: dict[int, int] = field(default_factory=dict)
    ws_closes: dict[int, int] = field(default_factory=dict)
    ws_opens: int = 0
    samples: dict[str, int] = field(default_factory=_counts)
    bytes_in: dict[str, int] = field(default_factory=_counts)
    records: int = 0
    entries: int = 0
    decode_errors: int = 0
    unknown_records: int = 0
    gap_entries: int = 0
    stream_resets: int = 0
    overflow: dict[str, int] = field(default_factory=dict)
    dropped_boots: dict[str, int] = field(default_factory=dict)
    dropped_retired: int = 0
    window: dict[int, list[int]] = field(default_factory=dict)
    # Counted events by (kind, route, method, status): rate-limit verdicts, and the like.
    events: dict[tuple[int, str, str, int], int] = field(default_factory=dict)
    # Not saved: the newest sampled request per histogram bucket.
    exemplars: dict[HttpKey, list[Exemplar | None]] = field(default_factory=dict)
    # Bumped on every change, so a saver can tell whether there is anything new to save.
    generation: int = 0

    # -- ingestion -----------------------------------------------------------------------

    def add_batch(self, batch: TelemetryBatch) -> None:
        """Aggregate one decoded stream entry. The hot loop of the sidecar."""
        records = batch.records
        http = self.http
        bounds = _BOUNDS_US
        window = self._window_bucket(batch.sent_ms // 1000)
        http_samples = http_bytes = 0
        sampled: list[tuple[HttpKey, int, int, str]] | None = None
        for kind, route, method, status, duration_us, size, samples, trace_id in records:
            if kind == 0:  # Kind.HTTP, spelled as a literal: the enum lookup costs here
                key = (route, method, status)
                series = http.get(key)
                if series is None:
                    series = self._new_http_series(key)
                i = bisect_left(bounds, duration_us)
                series[i] += 1
                series[_SUM] += duration_us
                window[i] += 1
                if status >= 400:
                    window[_E4XX if status < 500 else _E5XX] += 1
                http_samples += samples
                http_bytes += size
                if trace_id is not None:
                    if sampled is None:
                        sampled = []
                    sampled.append((key, i, duration_us, trace_id))
            else:
                self._add_other(kind, route, method, status, size, samples, window)
        self.samples["http"] += http_samples
        self.bytes_in["http"] += http_bytes
        if sampled is not None:
            self._keep_exemplars(sampled, batch.sent_ms / 1000)
        self._note_dropped(batch.boot_id, batch.dropped_total)
        self.records += len(records)
        self.entries += 1
        self.generation += 1

    def _add_other(
        self,
        kind: int,
        route: str,
        method: str,
        status: int,
        size: int,
        samples: int,
        window: list[int],
    ) -> None:
        if kind == Kind.WS_MESSAGE:
            window[_WSMSG] += 1
            status = status if status in _STATUSES else _OTHER_CODE
            self.ws_messages[status] = self.ws_messages.get(status, 0) + 1
            self.samples["ws"] += samples
            self.bytes_in["ws"] += size
        elif kind == Kind.WS_OPEN:
            self.ws_opens += 1
        elif kind == Kind.WS_CLOSE:
            code = status if status in _CLOSE_CODES else _OTHER_CODE
            self.ws_closes[code] = self.ws_closes.get(code, 0) + 1
        elif kind in _EVENT_KINDS:
            key = (kind, route, method, status)
            if key not in self.events and len(self.events) >= self.max_series:
                self.overflow["events"] = self.overflow.get("events", 0) + 1
                key = (kind, OVERFLOW, method, status)
            self.events[key] = self.events.get(key, 0) + 1
        else:
            self.unknown_records += 1

    def _new_http_series(self, key: HttpKey) -> list[int]:
        route, method, status = key
        if method not in _METHODS:
            method = "OTHER"
        if status not in _STATUSES:
            status = _OTHER_CODE
        clean = (route, method, status)
        if clean != key:
            series = self.http.get(clean)
            if series is not None:
                return series
        if len(self.http) >= self.max_series:
            # Beyond the cap every new route folds into one route value per method and
            # status, so the series count stays bounded whatever the service sends.
            name = "http_request_duration_seconds"
            self.overflow[name] = self.overflow.get(name, 0) + 1
            clean = (OVERFLOW, method, status)
            series = self.http.get(clean)
            if series is not None:
                return series
        series = [0] * (_NB + 1)
        self.http[clean] = series
        return series

    def _keep_exemplars(self, sampled: list[tuple[HttpKey, int, int, str]], at: float) -> None:
        for key, i, duration_us, trace_id in sampled:
            if key not in self.http:
                continue  # folded into the overflow series; its exemplars would mislead
            slots = self.exemplars.get(key)
            if slots is None:
                slots = self.exemplars[key] = [None] * _NB
            # OpenMetrics allows 128 characters of exemplar labels; trace ids are 32.
            slots[i] = Exemplar(trace_id[:64], duration_us / 1_000_000, at)

    def _note_dropped(self, boot_id: str, dropped_total: int) -> None:
        boots = self.dropped_boots
        known = boots.get(boot_id)
        if known is None:
            boots[boot_id] = dropped_total
            if len(boots) > _BOOTS_KEPT:
                oldest = next(iter(boots))
                self.dropped_retired += boots.pop(oldest)
        elif dropped_total > known:
            boots[boot_id] = dropped_total

    def _window_bucket(self, sent_s: int) -> list[int]:
        start = sent_s - sent_s % WINDOW_SECONDS
        bucket = self.window.get(start)
        if bucket is None:
            bucket = self.window[start] = [0] * (_NB + 3)
            oldest = start - WINDOW_SECONDS * WINDOW_BUCKETS
            for stale in [s for s in self.window if s <= oldest]:
                del self.window[stale]
        return bucket

    def note_decode_error(self) -> None:
        self.decode_errors += 1
        self.entries += 1
        self.generation += 1

    # -- reading ---------------------------------------------------------------------------

    @property
    def dropped_total(self) -> int:
        return self.dropped_retired + sum(self.dropped_boots.values())

    @property
    def http_requests(self) -> int:
        return sum(sum(series[:_NB]) for series in self.http.values())

    def http_series(self) -> Iterator[tuple[HttpKey, list[int], int]]:
        """(key, per-bucket counts with +Inf last, duration sum in µs) of each series."""
        for key, series in self.http.items():
            yield key, series[:_NB], series[_SUM]

    def window_points(self, now_s: float) -> list[WindowPoint]:
        """The last ``WINDOW_BUCKETS`` complete buckets before ``now_s``, oldest first."""
        current = int(now_s) - int(now_s) % WINDOW_SECONDS
        points = []
        for n in range(WINDOW_BUCKETS, 0, -1):
            start = current - n * WINDOW_SECONDS
            bucket = self.window.get(start)
            if bucket is None:
                points.append(WindowPoint(start, 0, 0, 0, 0, None))
                continue
            counts = bucket[:_NB]
            points.append(
                WindowPoint(
                    start,
                    sum(counts),
                    bucket[_E4XX],
                    bucket[_E5XX],
                    bucket[_WSMSG],
                    percentile_from_buckets(counts, 0.95),
                )
            )
        return points

    # -- saving ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        saved = _Saved(
            version=_STATE_VERSION,
            last_id=self.last_id,
            entries_read=self.entries_read,
            bounds_us=_BOUNDS_US,
            http=[(r, m, s, series) for (r, m, s), series in self.http.items()],
            ws_messages=list(self.ws_messages.items()),
            ws_closes=list(self.ws_closes.items()),
            ws_opens=self.ws_opens,
            samples=self.samples,
            bytes_in=self.bytes_in,
            records=self.records,
            entries=self.entries,
            decode_errors=self.decode_errors,
            unknown_records=self.unknown_records,
            gap_entries=self.gap_entries,
            stream_resets=self.stream_resets,
            overflow=self.overflow,
            dropped_boots=list(self.dropped_boots.items()),
            dropped_retired=self.dropped_retired,
            window=list(self.window.items()),
            events=[(k, r, m, s, n) for (k, r, m, s), n in self.events.items()],
        )
        return _saved_encoder.encode(saved)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_series: int) -> "Aggregator":
        """The saved state; ``ValueError`` if it is not one this version can continue."""
        try:
            saved = _saved_decoder.decode(data)
        except msgspec.DecodeError as e:
            raise ValueError(f"unreadable sidecar state: {e}") from e
        if saved.version != _STATE_VERSION or saved.bounds_us != _BOUNDS_US:
            raise ValueError(
                f"sidecar state of version {saved.version} with buckets {saved.bounds_us}"
                " does not match this version"
            )
        return cls(
            max_series=max_series,
            last_id=saved.last_id,
            entries_read=saved.entries_read,
            # A lowered cap keeps the series already known: dropping them would make
            # their counters go back to zero.
            http={(r, m, s): series for r, m, s, series in saved.http},
            ws_messages=dict(saved.ws_messages),
            ws_closes=dict(saved.ws_closes),
            ws_opens=saved.ws_opens,
            samples={**_counts(), **saved.samples},
            bytes_in={**_counts(), **saved.bytes_in},
            records=saved.records,
            entries=saved.entries,
            decode_errors=saved.decode_errors,
            unknown_records=saved.unknown_records,
            gap_entries=saved.gap_entries,
            stream_resets=saved.stream_resets,
            overflow=saved.overflow,
            dropped_boots=dict(saved.dropped_boots),
            dropped_retired=saved.dropped_retired,
            window=dict(saved.window),
            events={(k, r, m, s): n for k, r, m, s, n in saved.events},
        )


def percentile_from_buckets(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile in seconds, interpolated within its bucket as Prometheus does.

    ``counts`` are per bucket (not cumulative), +Inf last; None without observations. A
    quantile in the +Inf bucket is reported as the largest finite bound.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(DURATION_BUCKETS_S):
                return DURATION_BUCKETS_S[-1]
            lower = DURATION_BUCKETS_S[i - 1] if i else 0.0
            upper = DURATION_BUCKETS_S[i]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return DURATION_BUCKETS_S[-1]
