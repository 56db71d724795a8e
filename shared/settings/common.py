"""The sections several programs read: who the process is, where its dependencies are,
logs, traces, operator access, health checks, HTTP deadlines, shutdown, telemetry.

A program's settings class (``programs.py``) inherits the sections it reads, so attribute
access stays flat (``settings.redis_url``) and shared code can ask for just the section it
needs (``setup_logging(settings: LoggingSection)``). A section that inherits another reads
it too: logs and traces carry the pod's identity, health checks probe Redis, Postgres, the
AI service and the log volume.
"""

import socket
from dataclasses import dataclass

from .fields import Section, variable
from .values import (
    Boolean,
    Choice,
    FieldNames,
    FloatRange,
    IntRange,
    KeyPrefix,
    OrNone,
    Text,
    Url,
)

__all__ = (
    "PORT",
    "SECRET",
    "AiServiceSection",
    "HealthChecksSection",
    "HttpSection",
    "IdentitySection",
    "ListenSection",
    "LoggingSection",
    "OperatorSection",
    "PostgresSection",
    "RedisSection",
    "ShutdownSection",
    "TelemetrySection",
    "TracingSection",
)

PORT = IntRange(1, 65535)
# A token: unset when empty, kept out of the repr and the logs.
SECRET = OrNone(Text())
_OPTIONAL_HTTP_URL = OrNone(Url(("http", "https")))


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
class ListenSection(Section):
    """The HTTP port a server listens on, on all interfaces."""

    __slots__ = ()
    title = "Listening"

    port: int = variable("PORT", 3001, PORT, "HTTP port, on all interfaces")


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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
    redis_cluster: bool = variable(
        "REDIS_CLUSTER",
        False,
        Boolean(),
        "Redis Cluster: REDIS_URL names any node (seed); keys are routed by hash slot",
    )
    redis_key_prefix: str = variable(
        "REDIS_KEY_PREFIX",
        "pulsecal:",
        KeyPrefix(),
        "prefix of every Redis key; the same for every process of a deployment",
    )


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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
        OrNone(Text()),
        "Logstash to send JSON log lines to over TCP; unset: none",
    )
    logstash_port: int = variable("LOGSTASH_PORT", 5000, PORT, "Logstash's TCP port")
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
class OperatorSection(IdentitySection):
    """Who sees health details and the dashboard (docs/health.md)."""

    __slots__ = ()
    title = "Operator access"

    health_detail_token: str | None = variable(
        "HEALTH_DETAIL_TOKEN",
        None,
        SECRET,
        "bearer token of the operators: health details and the dashboard (unset: METRICS_TOKEN)",
        secret=True,
    )
    metrics_token: str | None = variable(
        "METRICS_TOKEN",
        None,
        SECRET,
        "when set, the sidecar's /metrics wants it as a bearer token; the operator token "
        "when HEALTH_DETAIL_TOKEN is unset",
        secret=True,
    )


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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
