"""The configuration in sections: each a frozen dataclass of the variables one concern reads.

A program's settings class (``programs.py``) inherits the sections it reads, so attribute
access stays flat (``settings.redis_url``) and shared code can ask for just the section it
needs (``setup_logging(settings: LoggingSection)``). Sections declare ``__slots__ = ()``: that
keeps them free of instance layout, so a program class may combine any number of them and
still be slotted itself. A section is never instantiated on its own.

A section that inherits another reads it too: logs and traces carry the pod's identity,
health checks probe Redis, Postgres, the AI service and the log volume.
"""

import dataclasses
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .values import (
    Boolean,
    Choice,
    FieldNames,
    FloatRange,
    IntRange,
    IpNetwork,
    KeyPrefix,
    Networks,
    Optional,
    Parser,
    PolicyNames,
    Text,
    Url,
)

__all__ = (
    "SECTIONS",
    "AiServiceSection",
    "AlertRulesSection",
    "AlertsApiSection",
    "AnalysisJobsSection",
    "HealthChecksSection",
    "HttpSection",
    "IdentitySection",
    "IngestSection",
    "ListenSection",
    "LoggingSection",
    "OperatorSection",
    "PostgresSection",
    "RateLimitSection",
    "RedisSection",
    "Section",
    "ShutdownSection",
    "SidecarSection",
    "TelemetrySection",
    "TracingSection",
    "WorkerSection",
    "redefault",
    "variable",
)

T = TypeVar("T")

_PORT = IntRange(1, 65535)
_OPTIONAL_HTTP_URL = Optional(Url(("http", "https")))
_SECRET = Optional(Text())


def variable(
    name: str, default: T, parse: Parser[T], description: str, *, secret: bool = False
) -> T:
    """A field read from the environment variable ``name``; a secret stays out of the repr
    (settings get logged) and out of the logs (``shared.logs.configured_secrets``)."""
    field: Any = dataclasses.field(
        default=default,
        repr=not secret,
        metadata={"env": name, "parse": parse, "description": description, "secret": secret},
    )
    return field  # type: ignore[no-any-return]  # a field stands for its default, as in dataclasses


def redefault(section: type["Section"], attribute: str, default: T) -> T:
    """``section``'s field ``attribute`` with a program's own default, its variable unchanged."""
    [declared] = [f for f in dataclasses.fields(section) if f.name == attribute]
    field: Any = dataclasses.field(default=default, repr=declared.repr, metadata=declared.metadata)
    return field  # type: ignore[no-any-return]  # as in variable()


class Section:
    """What every section has: a title for ``--help`` and ``docs/configuration.md``."""

    __slots__ = ()
    title: ClassVar[str]

    if TYPE_CHECKING:
        __dataclass_fields__: ClassVar[dict[str, "dataclasses.Field[Any]"]]


@dataclass(frozen=True, kw_only=True)
class IdentitySection(Section):
    """Who the process is: its logs, traces, telemetry stream and heartbeat carry the pod's name."""

    __slots__ = ()
    title = "Identity"

    pod_name: str = variable(
        "POD_NAME",
        "",
        Text(),
        "the pod's name in telemetry, heartbeats, logs and traces; the host name when empty",
    )
    environment: str = variable(
        "ENVIRONMENT",
        "production",
        Text(),
        "a label on logs and traces; development shows health details when no operator "
        "token is set",
    )

    @property
    def pod(self) -> str:
        """The pod's name, or the host's when not running under Kubernetes."""
        return self.pod_name or socket.gethostname()


@dataclass(frozen=True, kw_only=True)
class ListenSection(Section):
    """The HTTP port a server listens on, on all interfaces."""

    __slots__ = ()
    title = "Listening"

    port: int = variable("PORT", 3001, _PORT, "HTTP port, on all interfaces")


@dataclass(frozen=True, kw_only=True)
class RedisSection(Section):
    """Redis: the readings stream, rate limits, telemetry, heartbeats, the sidecar's state."""

    __slots__ = ()
    title = "Redis"

    redis_url: str = variable(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        Url(("redis", "rediss", "unix")),
        "the Redis server",
    )
    redis_key_prefix: str = variable(
        "REDIS_KEY_PREFIX",
        "pulsecal:",
        KeyPrefix(),
        "prefix of every Redis key; the same for every process of a deployment",
    )


@dataclass(frozen=True, kw_only=True)
class PostgresSection(Section):
    """Postgres: devices and their tokens, readings, alerts, analyses."""

    __slots__ = ()
    title = "Postgres"

    database_url: str = variable(
        "DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/postgres",
        Url(("postgresql", "postgres")),
        "the Postgres database",
    )


@dataclass(frozen=True, kw_only=True)
class AiServiceSection(Section):
    """The analysis (AI) service the worker sends windows to and the health checks probe."""

    __slots__ = ()
    title = "AI service"

    ai_service_url: str | None = variable(
        "AI_SERVICE_URL",
        None,
        _OPTIONAL_HTTP_URL,
        "the analysis service (POST /analyze); unset: no analysis jobs, not health-checked",
    )


_DEFAULT_REDACTED = "authorization,cookie,token,password,passwd,secret,api_key,dsn,database_url"


@dataclass(frozen=True, kw_only=True)
class LoggingSection(IdentitySection):
    """Structured logs: stderr always; daily files and Logstash when configured
    (docs/errors-and-logging.md)."""

    __slots__ = ()
    title = "Logging"

    log_level: str = variable(
        "LOG_LEVEL",
        "info",
        Choice(("trace", "debug", "info", "warning", "error", "critical")),
        "the least severe level logged",
    )
    enable_file_logging: bool = variable(
        "ENABLE_FILE_LOGGING", False, Boolean(), "also write daily log files under LOG_DIR"
    )
    log_dir: str = variable("LOG_DIR", "./logs", Text(), "where the log files go")
    log_retention_days: int = variable(
        "LOG_RETENTION_DAYS",
        14,
        IntRange(1, 3650),
        "daily log files kept per kind, today's included",
    )
    log_compression: str = variable(
        "LOG_COMPRESSION",
        "none",
        Choice(("none", "gz", "bz2", "xz")),
        "how a day's files are compressed once the day is over",
    )
    log_redact_fields: tuple[str, ...] = variable(
        "LOG_REDACT_FIELDS",
        FieldNames()(_DEFAULT_REDACTED),
        FieldNames(),
        "field names (also as suffixes) whose values are never logged",
    )
    logstash_host: str | None = variable(
        "LOGSTASH_HOST",
        None,
        Optional(Text()),
        "Logstash to send JSON log lines to over TCP; unset: none",
    )
    logstash_port: int = variable("LOGSTASH_PORT", 5000, _PORT, "Logstash's TCP port")
    logstash_buffer_lines: int = variable(
        "LOGSTASH_BUFFER_LINES",
        10_000,
        IntRange(1, 10_000_000),
        "log lines kept while Logstash is away (the oldest are dropped, and counted)",
    )
    logstash_reconnect_max: float = variable(
        "LOGSTASH_RECONNECT_MAX",
        30.0,
        FloatRange(0.01, 3600),
        "longest pause in seconds between reconnects to Logstash",
    )


_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@dataclass(frozen=True, kw_only=True)
class TracingSection(IdentitySection):
    """OpenTelemetry traces over OTLP/HTTP (README, "Tracing"); the standard OTEL_* names.

    The traces endpoint wins over the base endpoint (+ /v1/traces), which wins over
    JAEGER_ENDPOINT.
    """

    __slots__ = ()
    title = "Tracing"

    tracing_enabled: bool = variable(
        "TRACING_ENABLED", False, Boolean(), "export OpenTelemetry spans"
    )
    jaeger_endpoint: str | None = variable(
        "JAEGER_ENDPOINT",
        None,
        _OPTIONAL_HTTP_URL,
        "a Jaeger collector, when no OTLP endpoint is set (its OTLP/HTTP port is used)",
    )
    otel_exporter_otlp_traces_endpoint: str | None = variable(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        None,
        _OPTIONAL_HTTP_URL,
        "where spans go, as is",
    )
    otel_exporter_otlp_endpoint: str | None = variable(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        None,
        _OPTIONAL_HTTP_URL,
        "OTLP/HTTP collector the spans go to (+ /v1/traces)",
    )
    otel_exporter_otlp_timeout_ms: int = variable(
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        5000,
        IntRange(10, 600_000),
        "milliseconds one export attempt may take",
    )
    otel_traces_sampler: str = variable(
        "OTEL_TRACES_SAMPLER",
        "parentbased_traceidratio",
        Choice(_SAMPLERS),
        "which requests are traced",
    )
    otel_traces_sampler_arg: float = variable(
        "OTEL_TRACES_SAMPLER_ARG",
        0.01,
        FloatRange(0.0, 1.0),
        "the ratio of the traceidratio samplers",
    )
    otel_bsp_max_queue_size: int = variable(
        "OTEL_BSP_MAX_QUEUE_SIZE",
        2048,
        IntRange(1, 1_000_000),
        "spans queued for export; more are dropped, and counted",
    )
    otel_bsp_schedule_delay_ms: int = variable(
        "OTEL_BSP_SCHEDULE_DELAY",
        2000,
        IntRange(1, 600_000),
        "milliseconds between exports",
    )
    otel_bsp_max_export_batch_size: int = variable(
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        512,
        IntRange(1, 1_000_000),
        "spans per export request",
    )


@dataclass(frozen=True, kw_only=True)
class OperatorSection(IdentitySection):
    """Who sees health details and the dashboard (docs/health.md)."""

    __slots__ = ()
    title = "Operator access"

    health_detail_token: str | None = variable(
        "HEALTH_DETAIL_TOKEN",
        None,
        _SECRET,
        "bearer token of the operators: health details and the dashboard (unset: METRICS_TOKEN)",
        secret=True,
    )
    metrics_token: str | None = variable(
        "METRICS_TOKEN",
        None,
        _SECRET,
        "when set, the sidecar's /metrics wants it as a bearer token; the operator token "
        "when HEALTH_DETAIL_TOKEN is unset",
        secret=True,
    )


@dataclass(frozen=True, kw_only=True)
class HealthChecksSection(RedisSection, PostgresSection, AiServiceSection, LoggingSection):
    """The background dependency checks behind /health, and their thresholds."""

    __slots__ = ()
    title = "Health checks"

    # Milliseconds, as in the original system.
    health_check_timeout_ms: int = variable(
        "HEALTH_CHECK_TIMEOUT",
        5000,
        IntRange(10, 120_000),
        "milliseconds one dependency check (or connection attempt) may take",
    )
    health_check_interval: float = variable(
        "HEALTH_CHECK_INTERVAL",
        5.0,
        FloatRange(0.05, 3600),
        "seconds between two rounds of checks",
    )
    memory_rss_threshold_mb: int = variable(
        "MEMORY_RSS_THRESHOLD_MB",
        1024,
        IntRange(16, 1 << 20),
        "resident memory (MB) above which memory_rss is down",
    )
    memory_heap_threshold_mb: int = variable(
        "MEMORY_HEAP_THRESHOLD_MB",
        768,
        IntRange(16, 1 << 20),
        "heap memory (MB) above which memory_heap is down",
    )
    disk_threshold_percent: float = variable(
        "DISK_THRESHOLD_PERCENT",
        0.9,
        FloatRange(0.01, 1.0),
        "used fraction of LOG_DIR's volume above which disk is down",
    )


@dataclass(frozen=True, kw_only=True)
class HttpSection(Section):
    """Deadlines of slow and idle HTTP clients, in seconds (docs/protocol-limits.md)."""

    __slots__ = ()
    title = "HTTP connections"

    http_header_timeout: float = variable(
        "HTTP_HEADER_TIMEOUT",
        10.0,
        FloatRange(0.05, 3600),
        "seconds a request head gets from its first byte (then 408)",
    )
    http_body_timeout: float = variable(
        "HTTP_BODY_TIMEOUT",
        30.0,
        FloatRange(0.05, 3600),
        "seconds a request body gets once its head is in (then 408)",
    )
    http_keepalive_timeout: float = variable(
        "HTTP_KEEPALIVE_TIMEOUT",
        75.0,
        FloatRange(0.05, 3600),
        "seconds an idle keep-alive connection is kept open",
    )


@dataclass(frozen=True, kw_only=True)
class ShutdownSection(Section):
    """How long a SIGTERM's drain may take."""

    __slots__ = ()
    title = "Shutdown"

    shutdown_timeout: float = variable(
        "SHUTDOWN_TIMEOUT",
        10.0,
        FloatRange(0, 300),
        "seconds in-flight work gets to finish on SIGTERM",
    )


@dataclass(frozen=True, kw_only=True)
class TelemetrySection(Section):
    """The per-request records and heartbeats a process writes for the sidecar of its pod.

    HEARTBEAT_TTL must exceed HEARTBEAT_INTERVAL.
    """

    __slots__ = ()
    title = "Telemetry and heartbeat"

    telemetry_flush_interval: float = variable(
        "TELEMETRY_FLUSH_INTERVAL",
        0.2,
        FloatRange(0.01, 60),
        "seconds between two writes of the buffered telemetry records",
    )
    telemetry_buffer_max: int = variable(
        "TELEMETRY_BUFFER_MAX",
        100_000,
        IntRange(100, 10_000_000),
        "records buffered between writes; more are dropped, and counted",
    )
    telemetry_stream_maxlen: int = variable(
        "TELEMETRY_STREAM_MAXLEN",
        10_000,
        IntRange(10, 10_000_000),
        "entries the telemetry stream keeps for the sidecar",
    )
    heartbeat_interval: float = variable(
        "HEARTBEAT_INTERVAL",
        2.0,
        FloatRange(0.05, 600),
        "seconds between two heartbeats",
    )
    heartbeat_ttl: int = variable(
        "HEARTBEAT_TTL",
        10,
        IntRange(1, 3600),
        "seconds a heartbeat lives: the process counts as gone when it expires",
    )
    sidecar_state_ttl: int = variable(
        "SIDECAR_STATE_TTL",
        7 * 86_400,
        IntRange(60, 366 * 86_400),
        "seconds the telemetry stream and the sidecar's saved totals outlive their last write",
    )


@dataclass(frozen=True, kw_only=True)
class RateLimitSection(Section):
    """Rate limits per client IP (API routes) and per device (ingestion) (README, "Rate limiting").

    A *_BURST_MAX of 0 turns that window off.
    """

    __slots__ = ()
    title = "Rate limiting"

    rate_limit_enabled: bool = variable(
        "RATE_LIMIT_ENABLED", True, Boolean(), "rate limiting on or off"
    )
    rate_limit_ttl: int = variable(
        "RATE_LIMIT_TTL", 60, IntRange(1, 86_400), "seconds of the API routes' long window"
    )
    rate_limit_max: int = variable(
        "RATE_LIMIT_MAX",
        100,
        IntRange(1, 10_000_000),
        "requests per client IP in the API routes' long window",
    )
    rate_limit_burst_max: int = variable(
        "RATE_LIMIT_BURST_MAX",
        20,
        IntRange(0, 10_000_000),
        "requests per client IP in the API routes' burst window (0: no burst window)",
    )
    rate_limit_burst_ttl: float = variable(
        "RATE_LIMIT_BURST_TTL",
        1.0,
        FloatRange(0.01, 86_400),
        "seconds of the API routes' burst window",
    )
    rate_limit_ingest_ttl: int = variable(
        "RATE_LIMIT_INGEST_TTL", 60, IntRange(1, 86_400), "seconds of ingestion's long window"
    )
    rate_limit_ingest_max: int = variable(
        "RATE_LIMIT_INGEST_MAX",
        1000,
        IntRange(1, 10_000_000),
        "batches per device in ingestion's long window",
    )
    rate_limit_ingest_burst_max: int = variable(
        "RATE_LIMIT_INGEST_BURST_MAX",
        0,
        IntRange(0, 10_000_000),
        "batches per device in ingestion's burst window (0: no burst window)",
    )
    rate_limit_ingest_burst_ttl: float = variable(
        "RATE_LIMIT_INGEST_BURST_TTL",
        1.0,
        FloatRange(0.01, 86_400),
        "seconds of ingestion's burst window",
    )
    rate_limit_shadow: tuple[str, ...] = variable(
        "RATE_LIMIT_SHADOW",
        (),
        PolicyNames(),
        "policies that only count what they would refuse",
    )
    rate_limit_fail_mode: str = variable(
        "RATE_LIMIT_FAIL_MODE",
        "open",
        Choice(("open", "closed")),
        "with Redis away: open (limits per process) or closed (503)",
    )
    rate_limit_ws_close_after: int = variable(
        "RATE_LIMIT_WS_CLOSE_AFTER",
        20,
        IntRange(1, 1_000_000),
        "refused WebSocket messages in a row before the socket is closed with 1008",
    )
    trusted_proxies: tuple[IpNetwork, ...] = variable(
        "TRUSTED_PROXIES",
        (),
        Networks(),
        "proxies whose client-address header is believed (docs/proxies.md)",
    )
    # The one header the trusted proxies write; the other is ignored.
    trusted_proxy_header: str = variable(
        "TRUSTED_PROXY_HEADER",
        "x-forwarded-for",
        Choice(("x-forwarded-for", "forwarded")),
        "the header the trusted proxies write; the other is ignored",
    )


@dataclass(frozen=True, kw_only=True)
class IngestSection(Section):
    """Device batches over HTTP and WebSocket: limits, the group-committed write, idempotency."""

    __slots__ = ()
    title = "Ingestion"

    max_body_bytes: int = variable(
        "MAX_BODY_BYTES",
        256 * 1024,
        IntRange(1024, 64 << 20),
        "largest request body or WebSocket message, in bytes",
    )
    token_refresh_interval: float = variable(
        "TOKEN_REFRESH_INTERVAL",
        5.0,
        FloatRange(0.05, 3600),
        "seconds between refreshes of the device-token cache: a revoked token's longest life",
    )
    write_timeout: float = variable(
        "WRITE_TIMEOUT",
        2.0,
        FloatRange(0.01, 60),
        "seconds a write to Redis may take before its batches are answered 503",
    )
    write_max_batch: int = variable(
        "WRITE_MAX_BATCH", 16, IntRange(1, 10_000), "batches group-committed in one write"
    )
    write_max_pending: int = variable(
        "WRITE_MAX_PENDING",
        20_000,
        IntRange(1, 10_000_000),
        "batches waiting for a write before more are answered 503",
    )
    write_max_in_flight: int = variable(
        "WRITE_MAX_IN_FLIGHT", 8, IntRange(1, 64), "writes to Redis in flight at once"
    )
    readings_max_backlog: int = variable(
        "READINGS_MAX_BACKLOG",
        1_000_000,
        IntRange(1, 1 << 40),
        "readings not yet persisted above which batches are answered 503",
    )
    backlog_check_interval: float = variable(
        "BACKLOG_CHECK_INTERVAL",
        1.0,
        FloatRange(0.01, 60),
        "seconds between two looks at the readings backlog",
    )
    idempotency_window: int = variable(
        "IDEMPOTENCY_WINDOW",
        128,
        IntRange(1, 100_000),
        "recent seqs remembered per device to acknowledge a retried batch once",
    )
    idempotency_ttl: int = variable(
        "IDEMPOTENCY_TTL",
        86_400,
        IntRange(1, 30 * 86_400),
        "seconds a device's remembered seqs outlive its last batch",
    )
    retry_after: int = variable(
        "RETRY_AFTER", 1, IntRange(1, 3600), "seconds a 503 tells the client to wait"
    )
    ws_heartbeat: float = variable(
        "WS_HEARTBEAT",
        30.0,
        FloatRange(1, 3600),
        "seconds a silent device socket waits for a ping, then as long for an answer",
    )
    ws_handshake_timeout: float = variable(
        "WS_HANDSHAKE_TIMEOUT",
        5.0,
        FloatRange(0.05, 600),
        "seconds a device gets to answer the close frame on shutdown",
    )


@dataclass(frozen=True, kw_only=True)
class AlertsApiSection(Section):
    """The operators' alerts API of the service (GET /alerts)."""

    __slots__ = ()
    title = "Alerts API"

    admin_token: str | None = variable(
        "ADMIN_TOKEN",
        None,
        _SECRET,
        "bearer token of the operators' GET /alerts (unset: that API answers 403)",
        secret=True,
    )


@dataclass(frozen=True, kw_only=True)
class SidecarSection(Section):
    """The sidecar: the telemetry it turns into /metrics (README, "Sidecar")."""

    __slots__ = ()
    title = "Sidecar"

    sidecar_port: int = variable("SIDECAR_PORT", 9464, _PORT, "the sidecar's HTTP port")
    metrics_enabled: bool = variable(
        "METRICS_ENABLED", True, Boolean(), "serve /metrics (false: 404, and nothing read)"
    )
    metrics_max_series: int = variable(
        "METRICS_MAX_SERIES",
        2000,
        IntRange(10, 1_000_000),
        "routes with series of their own before new ones fold into __overflow__",
    )
    sidecar_read_count: int = variable(
        "SIDECAR_READ_COUNT", 200, IntRange(1, 100_000), "telemetry entries per read"
    )
    sidecar_block_ms: int = variable(
        "SIDECAR_BLOCK_MS",
        1000,
        IntRange(1, 60_000),
        "milliseconds an idle read waits for new telemetry",
    )
    sidecar_checkpoint_interval: float = variable(
        "SIDECAR_CHECKPOINT_INTERVAL",
        1.0,
        FloatRange(0.01, 3600),
        "seconds between two saves of the position and totals",
    )


@dataclass(frozen=True, kw_only=True)
class WorkerSection(Section):
    """The worker: readings from the stream to Postgres (README, "Worker")."""

    __slots__ = ()
    title = "Worker"

    worker_port: int = variable("WORKER_PORT", 3002, _PORT, "HTTP port of the worker's probes")
    worker_batch: int = variable(
        "WORKER_BATCH", 500, IntRange(1, 100_000), "readings read and stored per round"
    )
    worker_block_ms: int = variable(
        "WORKER_BLOCK_MS",
        1000,
        IntRange(1, 60_000),
        "milliseconds an idle read waits for new readings",
    )
    worker_claim_idle: float = variable(
        "WORKER_CLAIM_IDLE",
        60.0,
        FloatRange(0.05, 86_400),
        "seconds before another consumer's unacknowledged entries are claimed",
    )
    worker_dead_letter_after: int = variable(
        "WORKER_DEAD_LETTER_AFTER",
        5,
        IntRange(1, 1000),
        "deliveries before a failing entry becomes a dead letter",
    )
    worker_retry_max: float = variable(
        "WORKER_RETRY_MAX",
        5.0,
        FloatRange(0.01, 600),
        "longest pause in seconds between retries while Postgres is away",
    )
    worker_trim_interval: float = variable(
        "WORKER_TRIM_INTERVAL",
        5.0,
        FloatRange(0.01, 3600),
        "seconds between two trims of the streams",
    )
    dead_letter_maxlen: int = variable(
        "DEAD_LETTER_MAXLEN", 100_000, IntRange(10, 100_000_000), "dead letters kept"
    )
    readings_partitions_ahead: int = variable(
        "READINGS_PARTITIONS_AHEAD",
        7,
        IntRange(1, 366),
        "daily partitions of readings created ahead",
    )


@dataclass(frozen=True, kw_only=True)
class AlertRulesSection(Section):
    """The vital and silence alert rules the worker evaluates (docs/alerts.md)."""

    __slots__ = ()
    title = "Alert rules"

    alert_hr_high: float = variable(
        "ALERT_HR_HIGH",
        120.0,
        FloatRange(1, 400),
        "hr_high opens when every reading of ALERT_HR_DURATION is above this (bpm)",
    )
    alert_hr_low: float = variable(
        "ALERT_HR_LOW",
        40.0,
        FloatRange(0, 400),
        "hr_low opens when every reading of ALERT_HR_DURATION is below this (bpm)",
    )
    alert_hr_duration: float = variable(
        "ALERT_HR_DURATION",
        60.0,
        FloatRange(0, 86_400),
        "seconds of readings the heart-rate rules look at",
    )
    alert_spo2_low: float = variable(
        "ALERT_SPO2_LOW",
        90.0,
        FloatRange(0, 100),
        "spo2_low opens when every reading of ALERT_SPO2_DURATION is below this (%)",
    )
    alert_spo2_duration: float = variable(
        "ALERT_SPO2_DURATION",
        30.0,
        FloatRange(0, 86_400),
        "seconds of readings the SpO2 rule looks at",
    )
    alert_max_gap: float = variable(
        "ALERT_MAX_GAP",
        10.0,
        FloatRange(0, 3600),
        "longest gap in seconds inside a run; a longer one starts it again",
    )
    alert_lateness: float = variable(
        "ALERT_LATENESS",
        5.0,
        FloatRange(0, 3600),
        "seconds out of ts order a reading may arrive and still count for the vital rules",
    )
    alert_silence_after: float = variable(
        "ALERT_SILENCE_AFTER",
        120.0,
        FloatRange(0, 30 * 86_400),
        "seconds without data before a device's silence alert opens (0: off)",
    )


@dataclass(frozen=True, kw_only=True)
class AnalysisJobsSection(Section):
    """The worker's analysis jobs: windows of readings sent to AI_SERVICE_URL."""

    __slots__ = ()
    title = "Analysis jobs"

    analysis_window: float = variable(
        "ANALYSIS_WINDOW", 30.0, FloatRange(1, 3600), "seconds of signal per analysis window"
    )
    analysis_grace: float = variable(
        "ANALYSIS_GRACE",
        2.0,
        FloatRange(0, 600),
        "seconds a job waits for other workers' batches of its window",
    )
    analysis_concurrency: int = variable(
        "ANALYSIS_CONCURRENCY", 4, IntRange(1, 1000), "jobs in progress per worker"
    )
    analysis_timeout: float = variable(
        "ANALYSIS_TIMEOUT", 10.0, FloatRange(0.01, 600), "seconds one call to the AI may take"
    )
    analysis_retries: int = variable(
        "ANALYSIS_RETRIES", 3, IntRange(0, 100), "retries of a failed call"
    )
    analysis_backoff: float = variable(
        "ANALYSIS_BACKOFF",
        0.5,
        FloatRange(0.001, 600),
        "seconds before the first retry, doubling (with jitter) after each",
    )
    analysis_backoff_max: float = variable(
        "ANALYSIS_BACKOFF_MAX",
        10.0,
        FloatRange(0.001, 3600),
        "longest pause in seconds between retries",
    )
    analysis_breaker_failures: int = variable(
        "ANALYSIS_BREAKER_FAILURES",
        5,
        IntRange(1, 10_000),
        "failed calls in a row that open the circuit",
    )
    analysis_breaker_reset: float = variable(
        "ANALYSIS_BREAKER_RESET",
        15.0,
        FloatRange(0.01, 3600),
        "seconds the circuit stays open before a trial call",
    )
    analysis_max_age: float = variable(
        "ANALYSIS_MAX_AGE",
        600.0,
        FloatRange(1, 30 * 86_400),
        "seconds a job may wait before it is stored as failed (expired)",
    )


# The order of --help and docs/configuration.md.
SECTIONS: tuple[type[Section], ...] = (
    IdentitySection,
    ListenSection,
    RedisSection,
    PostgresSection,
    AiServiceSection,
    LoggingSection,
    TracingSection,
    OperatorSection,
    HealthChecksSection,
    HttpSection,
    ShutdownSection,
    TelemetrySection,
    RateLimitSection,
    IngestSection,
    AlertsApiSection,
    SidecarSection,
    WorkerSection,
    AlertRulesSection,
    AnalysisJobsSection,
)
