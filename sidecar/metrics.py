"""The families of ``/metrics``: the seed's metrics and the sidecar's own, from the aggregate
and the heartbeat (``sidecar/scrape.py`` serves them).

``http_request_errors_total`` counts every response with status >= 400 (labelled with the
status, so an alert can select ``status=~"5.."``), as the original system's interceptor did.
The business counters (alerts, AI analyses) come from the worker's records and
``queue_jobs_active`` from its heartbeat, so they are 0 beside the service; ``queue_depth`` is
the analysis jobs waiting beside a worker, the readings backlog beside the service. Each
figure comes from the heartbeat type that carries it; beside the other program its series
reads 0.
"""

from collections.abc import Iterator, Mapping

from shared.health import CheckResult
from shared.telemetry import (
    ALERT_RULES,
    PROTOCOL_ERROR_KINDS,
    Heartbeat,
    ServiceHeartbeat,
    WorkerHeartbeat,
)
from shared.telemetry import Kind as TelemetryKind

from .aggregate import DURATION_BUCKETS_S, Aggregator, HttpKey
from .consumer import TelemetryConsumer
from .exposition import Family, Histogram, Kind, label_text
from .health import as_service
from .process import own_process

__all__ = (
    "MetricsView",
    "business_families",
    "health_families",
    "partition_order",
    "protocol_error_family",
)


class MetricsView:
    """Builds the families; keeps each HTTP series' rendered labels across scrapes."""

    def __init__(self) -> None:
        self._http_labels: dict[HttpKey, str] = {}

    def _labels(self, key: HttpKey) -> str:
        text = self._http_labels.get(key)
        if text is None:
            route, method, status = key
            text = self._http_labels[key] = label_text(
                (("method", method), ("route", route), ("status", status))
            )
        return text

    def families(
        self,
        aggregator: Aggregator,
        consumer: TelemetryConsumer,
        heartbeat: Heartbeat | None,
        *,
        heartbeat_age_s: float | None,
        max_series: int,
    ) -> list[Family]:
        out = list(self._http(aggregator))
        out.append(protocol_error_family(aggregator))
        out.extend(business_families(aggregator, heartbeat))
        out.extend(_telemetry(aggregator, consumer, max_series=max_series))
        out.extend(_service(heartbeat, heartbeat_age_s))
        out.extend(_own_process())
        return out

    def _http(self, aggregator: Aggregator) -> Iterator[Family]:
        duration = Family(
            "http_request_duration_seconds",
            "histogram",
            "HTTP request duration in seconds, by method, route template and status.",
            bounds=DURATION_BUCKETS_S,
        )
        requests = Family(
            "http_requests", "counter", "HTTP requests, by method, route template and status."
        )
        errors = Family(
            "http_request_errors",
            "counter",
            "HTTP responses with status >= 400, by method, route template and status.",
        )
        exemplars = aggregator.exemplars
        for key, counts, sum_us in aggregator.http_series():
            labels = self._labels(key)
            count = sum(counts)
            duration.histograms.append(
                Histogram(labels, counts, sum_us / 1_000_000, exemplars.get(key))
            )
            requests.samples.append((labels, count))
            if key[2] >= 400:
                errors.samples.append((labels, count))
        yield duration
        yield requests
        yield errors


def _family(name: str, kind: Kind, help_text: str, *samples: tuple[str, float]) -> Family:
    return Family(name, kind, help_text, list(samples))


def protocol_error_family(aggregator: Aggregator) -> Family:
    """``pulsecal_http_protocol_errors_total{kind}``: every kind, 0 until it happens, so a
    rate over it works from the first one; a kind this sidecar does not know is "other"."""
    by_kind = dict.fromkeys(PROTOCOL_ERROR_KINDS, 0)
    for (kind, route, _, _), n in aggregator.events.items():
        if kind == TelemetryKind.PROTOCOL_ERROR:
            name = route if route in by_kind else "other"
            by_kind[name] += n
    return _family(
        "pulsecal_http_protocol_errors",
        "counter",
        "Requests the service refused below its routes, by kind: a head its HTTP parser"
        " refused, a body whose framing or encoding broke, a head or body that came too slowly.",
        *((label_text((("kind", k),)), n) for k, n in sorted(by_kind.items())),
    )


def _worker_counters(aggregator: Aggregator) -> Iterator[Family]:
    """The business counters, from the worker's records (0 beside the service)."""
    opened = dict.fromkeys(ALERT_RULES, 0)
    cleared = dict.fromkeys(ALERT_RULES, 0)
    analyses = {"completed": 0, "failed": 0, "skipped": 0}
    dead: dict[str, int] = {}
    persisted: dict[int, int] = {}
    late = 0
    for (kind, route, method, status), n in aggregator.events.items():
        if kind == TelemetryKind.ALERT and method == "late":
            late += n
        elif kind == TelemetryKind.ALERT:
            into = opened if method == "open" else cleared
            into[route] = into.get(route, 0) + n
        elif kind == TelemetryKind.ANALYSIS:
            outcome = "completed" if status == 200 else "skipped" if status < 400 else "failed"
            analyses[outcome] += n
        elif kind == TelemetryKind.DEAD_LETTER:
            dead[route] = dead.get(route, 0) + n
        elif kind == TelemetryKind.PERSIST:
            persisted[status] = persisted.get(status, 0) + n
    yield _family(
        "alerts_created",
        "counter",
        "Alerts opened by the worker, by rule.",
        *((label_text((("rule", rule),)), n) for rule, n in sorted(opened.items())),
    )
    yield _family(
        "pulsecal_alerts_cleared",
        "counter",
        "Alerts cleared by the worker, by rule.",
        *((label_text((("rule", rule),)), n) for rule, n in sorted(cleared.items())),
    )
    yield _family(
        "pulsecal_alert_late_readings",
        "counter",
        "Readings stored after their device's lateness bound: not evaluated by the vital rules.",
        ("", late),
    )
    yield _family(
        "ai_analysis_completed", "counter", "AI analyses completed.", ("", analyses["completed"])
    )
    yield _family(
        "ai_analysis_failed",
        "counter",
        "AI analyses failed (refused by the AI, or out of retries).",
        ("", analyses["failed"]),
    )
    yield _family(
        "pulsecal_ai_analysis_skipped",
        "counter",
        "Analysis windows skipped (too little data to send).",
        ("", analyses["skipped"]),
    )
    yield _family(
        "pulsecal_dead_letters",
        "counter",
        "Readings entries moved to the dead-letter stream, by reason.",
        *((label_text((("reason", r),)), n) for r, n in sorted(dead.items())),
    )
    yield _family(
        "pulsecal_worker_commits",
        "counter",
        "Groups of readings the worker tried to commit to Postgres, by status.",
        *((label_text((("status", st),)), n) for st, n in sorted(persisted.items())),
    )


def business_families(aggregator: Aggregator, heartbeat: Heartbeat | None) -> Iterator[Family]:
    yield _family(
        "metrics_ingested",
        "counter",
        "PPG samples accepted, by transport.",
        *((f'transport="{t}"', n) for t, n in aggregator.samples.items()),
    )
    yield from _worker_counters(aggregator)
    yield _family(
        "websocket_connections_active",
        "gauge",
        "Open device WebSocket connections (from the service's heartbeat; 0 while it is down).",
        ("", heartbeat.ws_connections if isinstance(heartbeat, ServiceHeartbeat) else 0),
    )
    yield _family(
        "websocket_messages",
        "counter",
        "WebSocket messages received, by the status they were answered with.",
        *((f'status="{s}"', n) for s, n in sorted(aggregator.ws_messages.items())),
    )
    yield _family(
        "queue_jobs_active",
        "gauge",
        "Analysis jobs this worker is running (0 beside the service).",
        ("", heartbeat.queue_jobs_active if isinstance(heartbeat, WorkerHeartbeat) else 0),
    )
    # Beside a worker: analysis jobs waiting (the same in every worker pod: take the max).
    # Beside the service: the readings backlog it guards (largest lag + pending of any group).
    if isinstance(heartbeat, WorkerHeartbeat):
        depth = heartbeat.queue_depth
    elif isinstance(heartbeat, ServiceHeartbeat):
        depth = heartbeat.backlog
    else:
        depth = 0
    yield _family(
        "queue_depth",
        "gauge",
        "Jobs waiting: analysis jobs beside a worker, readings batches beside the service.",
        ("", depth),
    )
    in_use = 0
    if heartbeat is not None:
        in_use = heartbeat.db_pool.get("size", 0) - heartbeat.db_pool.get("available", 0)
    yield _family(
        "database_connections_active",
        "gauge",
        "Database connections the service has in use.",
        ("", max(0, in_use)),
    )
    yield _family(
        "pulsecal_websocket_connections_opened",
        "counter",
        "WebSocket connections accepted.",
        ("", aggregator.ws_opens),
    )
    yield _family(
        "pulsecal_websocket_connections_closed",
        "counter",
        "WebSocket connections closed, by close code (0: outside the valid range).",
        *((f'code="{c}"', n) for c, n in sorted(aggregator.ws_closes.items())),
    )
    yield _family(
        "rate_limit_rejections",
        "counter",
        "Requests and WebSocket messages over a rate-limit policy, by policy, route and mode"
        " (enforced: refused with 429; shadow: let through, counted only).",
        *(
            (
                label_text(
                    (
                        ("policy", policy),
                        ("route", route),
                        ("mode", "enforced" if status == 429 else "shadow"),
                    )
                ),
                n,
            )
            for (kind, route, policy, status), n in sorted(aggregator.events.items())
            if kind == TelemetryKind.RATE_LIMITED
        ),
    )
    yield _family(
        "pulsecal_ingest_received_bytes",
        "counter",
        "Bytes of request bodies and WebSocket messages received, by transport.",
        *((f'transport="{t}"', n) for t, n in aggregator.bytes_in.items()),
    )


def _telemetry(
    aggregator: Aggregator, consumer: TelemetryConsumer, *, max_series: int
) -> Iterator[Family]:
    yield _family(
        "pulsecal_telemetry_dropped",
        "counter",
        "Telemetry records the service dropped (buffer full while Redis was away).",
        ("", aggregator.dropped_total),
    )
    yield _family(
        "pulsecal_telemetry_gap_entries",
        "counter",
        "Telemetry stream entries trimmed away (MAXLEN) before the sidecar read them.",
        ("", aggregator.gap_entries),
    )
    yield _family(
        "pulsecal_sidecar_records_consumed",
        "counter",
        "Telemetry records aggregated.",
        ("", aggregator.records),
    )
    yield _family(
        "pulsecal_sidecar_entries_consumed",
        "counter",
        "Telemetry stream entries (batches of records) read.",
        ("", aggregator.entries),
    )
    yield _family(
        "pulsecal_sidecar_decode_errors",
        "counter",
        "Telemetry stream entries that could not be decoded and were skipped.",
        ("", aggregator.decode_errors),
    )
    yield _family(
        "pulsecal_sidecar_unknown_records",
        "counter",
        "Telemetry records of a kind this sidecar does not know.",
        ("", aggregator.unknown_records),
    )
    yield _family(
        "pulsecal_sidecar_stream_resets",
        "counter",
        "Times the telemetry stream was found recreated and read again from its start.",
        ("", aggregator.stream_resets),
    )
    yield _family(
        "pulsecal_sidecar_series_overflow",
        "counter",
        "Records folded into the overflow series because a metric reached METRICS_MAX_SERIES.",
        *(
            (f'metric="{m}"', n)
            for m, n in sorted({"http_request_duration_seconds": 0, **aggregator.overflow}.items())
        ),
    )
    yield _family(
        "pulsecal_sidecar_series",
        "gauge",
        "Series per metric, against the cap METRICS_MAX_SERIES.",
        ('metric="http_request_duration_seconds"', len(aggregator.http)),
    )
    yield _family("pulsecal_sidecar_series_limit", "gauge", "METRICS_MAX_SERIES.", ("", max_series))
    yield _family(
        "pulsecal_sidecar_lag_seconds",
        "gauge",
        "How far the sidecar is behind the head of the telemetry stream.",
        ("", consumer.lag_s),
    )
    yield _family(
        "pulsecal_sidecar_backlog_entries",
        "gauge",
        "Telemetry stream entries not read yet.",
        ("", consumer.backlog),
    )
    yield _family(
        "pulsecal_sidecar_read_errors",
        "counter",
        "Failed reads of the telemetry stream since this sidecar started.",
        ("", consumer.read_errors),
    )
    yield _family(
        "pulsecal_sidecar_checkpoint_failures",
        "counter",
        "Failed checkpoint writes since this sidecar started.",
        ("", consumer.checkpoint_failures),
    )
    yield _family(
        "pulsecal_sidecar_last_checkpoint_timestamp_seconds",
        "gauge",
        "When the checkpoint was last written (0: not by this process yet).",
        ("", consumer.saved_at),
    )


def _service(heartbeat: Heartbeat | None, age_s: float | None) -> Iterator[Family]:
    yield _family(
        "pulsecal_service_up",
        "gauge",
        "1 while the service's heartbeat is fresh (younger than HEARTBEAT_TTL).",
        ("", 1 if heartbeat else 0),
    )
    if age_s is not None:
        yield _family(
            "pulsecal_service_heartbeat_age_seconds",
            "gauge",
            "Age of the service's last heartbeat.",
            ("", round(age_s, 3)),
        )
    if heartbeat is None:
        return
    hb = heartbeat
    svc = as_service(hb)
    yield _family(
        "pulsecal_service",
        "info",
        "The service process reporting through this pod's heartbeat.",
        (label_text((("program", hb.program), ("version", hb.version))), 1),
    )
    pool = hb.db_pool
    gauges: list[tuple[str, str, float]] = [
        ("start_time_seconds", "Start time of the service process.", hb.started_ms / 1000),
        ("resident_memory_bytes", "Resident memory of the service.", hb.rss_bytes),
        ("heap_bytes", "Anonymous resident memory of the service (its heap).", hb.heap_bytes),
        (
            "event_loop_lag_seconds",
            "Worst loop lag since the last heartbeat.",
            hb.loop_lag_ms / 1e3,
        ),
        ("http_connections", "Open HTTP connections to the service.", svc.http_connections),
        ("pending_writes", "Batches waiting to be written to Redis.", svc.pending_writes),
        ("ready", "1 while the service is ready to take data.", int(hb.ready)),
        ("draining", "1 while the service is shutting down.", int(hb.draining)),
        ("redis_up", "1 while the service's Redis check passes.", int(hb.redis_ok)),
        (
            "backlog_exceeded",
            "1 while the readings backlog is over its limit.",
            int(svc.backlog_exceeded),
        ),
        ("device_tokens", "Device tokens in the service's cache.", svc.tokens_loaded),
        (
            "ack_replicas",
            "Replicas an ack waits for (ACK_MODE=replicated; 0: the primary's ack).",
            svc.ack_replicas,
        ),
        (
            "redis_primary",
            "1 while the Redis the service writes to is a primary.",
            int(svc.redis_role == "primary"),
        ),
        (
            "redis_replicas_online",
            "Replicas online behind the Redis the service writes to.",
            svc.redis_replicas_online,
        ),
        (
            "redis_replication_lag_seconds",
            "Largest lag of those replicas (whole seconds, as Redis counts).",
            svc.redis_replication_lag_seconds,
        ),
        ("db_pool_connections", "Connections open in its Postgres pool.", pool.get("size", 0)),
        ("db_pool_waiting", "Requests waiting for a Postgres connection.", pool.get("waiting", 0)),
    ]
    for name, help_text, value in gauges:
        yield _family(f"pulsecal_service_{name}", "gauge", help_text, ("", value))
    yield _family(
        "pulsecal_service_writes",
        "counter",
        "Readings batches written by this service process, by result.",
        ('result="ok"', svc.writes_ok),
        ('result="duplicate"', svc.writes_duplicate),
        ('result="failed"', svc.writes_failed),
        ('result="unreplicated"', svc.writes_unreplicated),
    )
    yield _family(
        "pulsecal_service_write_batches",
        "counter",
        "Group-commit writes made by this service process.",
        ("", svc.write_batches),
    )
    if isinstance(hb, WorkerHeartbeat):
        yield from _worker_gauges(hb)
    # Totals of this process instance (they restart with it, like any process counter).
    for name, help_text, value in (
        ("spans_dropped", "Trace spans lost: collector away or queue full.", hb.spans_dropped),
        ("log_lines_dropped", "Log lines Logstash never got.", hb.log_lines_dropped),
        (
            "rate_limit_fallbacks",
            "Rate-limit decisions made per process while Redis was away.",
            svc.rate_limit_fallbacks,
        ),
    ):
        yield _family(f"pulsecal_service_{name}", "counter", help_text, ("", value))


def _worker_gauges(hb: WorkerHeartbeat) -> Iterator[Family]:
    for name, help_text, value in (
        (
            "readings_lag",
            "Readings stream entries not yet persisted (undelivered + unacked); an entry"
            " carries the batches of one write of the service.",
            hb.readings_lag,
        ),
        ("dead_letters", "Entries in the dead-letter stream.", hb.dead_letters),
        ("alerts_open", "Alerts open now.", hb.alerts_open),
        (
            "ai_circuit_open",
            "1 while the AI circuit breaker is open.",
            int(hb.ai_circuit != "closed"),
        ),
    ):
        yield _family(f"pulsecal_worker_{name}", "gauge", help_text, ("", value))
    # Every worker measures every partition: each worker pod's sidecar exports the same
    # figures, so queries take `max by (partition)`.
    yield _family(
        "pulsecal_worker_partition_backlog",
        "gauge",
        "Readings entries awaiting the persist group (undelivered + unacked), by partition"
        " (<index>/<count>); the same in every worker pod: take the max by partition.",
        *(
            (label_text((("partition", name),)), n)
            for name, n in sorted(hb.partition_backlog.items(), key=partition_order)
        ),
    )
    for name, help_text, value in (
        ("rows_persisted", "Rows this worker process inserted.", hb.rows_persisted),
        ("samples_persisted", "PPG samples this worker process inserted.", hb.samples_persisted),
        (
            "pods_removed",
            "Gone pods whose Redis keys this worker process removed (POD_KEYS_GRACE).",
            hb.pods_removed,
        ),
    ):
        yield _family(f"pulsecal_worker_{name}", "counter", help_text, ("", value))


def partition_order(item: tuple[str, int]) -> tuple[int, int, int, str]:
    """Partitions by count, then index (``"2/12"`` before ``"10/12"``); a name not of the form
    ``<index>/<count>`` after them all, by name."""
    name = item[0]
    index, slash, count = name.partition("/")
    if slash and index.isdecimal() and count.isdecimal():
        return (0, int(count), int(index), name)
    return (1, 0, 0, name)


def _own_process() -> Iterator[Family]:
    own = own_process()
    yield _family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the sidecar.",
        ("", own.rss_bytes),
    )
    yield _family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory of the sidecar.",
        ("", own.virtual_bytes),
    )
    yield _family(
        "process_cpu_seconds",
        "counter",
        "CPU time the sidecar has used.",
        ("", round(own.cpu_seconds, 2)),
    )
    yield _family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the sidecar process.",
        ("", own.start_time_s),
    )
    yield _family("process_open_fds", "gauge", "Open file descriptors.", ("", own.open_fds))


def health_families(checks: Mapping[str, CheckResult]) -> Iterator[Family]:
    """The aggregated health's checks as gauges: what ``DatabaseDown`` and the like alert on."""
    ordered = sorted(checks.items())
    yield _family(
        "pulsecal_health_check_up",
        "gauge",
        "1 if the health check passed at its last run, else 0, by check.",
        *((label_text((("check", name),)), int(result.up)) for name, result in ordered),
    )
    yield _family(
        "pulsecal_health_check_duration_seconds",
        "gauge",
        "How long the health check took at its last run, by check.",
        *((label_text((("check", name),)), result.duration_ms / 1000) for name, result in ordered),
    )
