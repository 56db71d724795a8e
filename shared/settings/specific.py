"""The sections one program reads: the service's rate limits, ingestion and alerts API, the
sidecar's, the worker's with its alert rules and analysis jobs."""

from dataclasses import dataclass

from .common import PORT, SECRET
from .fields import Section, variable
from .values import Boolean, Choice, FloatRange, IntRange, IpNetwork, Networks, PolicyNames

__all__ = (
    "AlertRulesSection",
    "AlertsApiSection",
    "AnalysisJobsSection",
    "IngestSection",
    "PartitionsSection",
    "RateLimitSection",
    "SidecarSection",
    "WorkerSection",
)


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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
    ack_mode: str = variable(
        "ACK_MODE",
        "primary",
        Choice(("primary", "replicated")),
        "what an ack promises: the Redis primary has the batch (primary), or ACK_REPLICAS"
        " replicas have it too (replicated; else 503)",
    )
    ack_replicas: int = variable(
        "ACK_REPLICAS", 1, IntRange(1, 16), "replicas an ack waits for with ACK_MODE=replicated"
    )
    ack_timeout: float = variable(
        "ACK_TIMEOUT",
        0.5,
        FloatRange(0.001, 30),
        "seconds a write waits for its replicas (ACK_MODE=replicated) before its batches are"
        " answered 503; less than WRITE_TIMEOUT",
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
class PartitionsSection(Section):
    """The readings partitions (docs/scaling.md): the services write P streams, the workers
    divide them among themselves."""

    __slots__ = ()
    title = "Readings partitions"

    ingest_partitions: int = variable(
        "INGEST_PARTITIONS",
        1,
        IntRange(1, 1024),
        "readings partition streams a device is spread over by its id (1: one stream); "
        "changing it starts a new layout the workers drain the old one beside",
    )
    ingest_layout_grace: float = variable(
        "INGEST_LAYOUT_GRACE",
        600.0,
        FloatRange(1, 7 * 86_400),
        "seconds after the last service wrote an old layout before drained workers forget it",
    )


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
class AlertsApiSection(Section):
    """The operators' alerts API of the service (GET /alerts)."""

    __slots__ = ()
    title = "Alerts API"

    admin_token: str | None = variable(
        "ADMIN_TOKEN",
        None,
        SECRET,
        "bearer token of the operators' GET /alerts (unset: that API answers 403)",
        secret=True,
    )


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
class SidecarSection(Section):
    """The sidecar: the telemetry it turns into /metrics (README, "Sidecar")."""

    __slots__ = ()
    title = "Sidecar"

    sidecar_port: int = variable("SIDECAR_PORT", 9464, PORT, "the sidecar's HTTP port")
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
    dependency_metrics: bool = variable(
        "DEPENDENCY_METRICS",
        True,
        Boolean(),
        "beside a worker (known from its heartbeat): export Redis's health and the readings"
        " streams' lengths, group lag and dead letters (docs/sidecar-and-metrics.md)",
    )
    dependency_metrics_cache: float = variable(
        "DEPENDENCY_METRICS_CACHE",
        5.0,
        FloatRange(0, 3600),
        "seconds a collection of Redis's figures serves scrapes before the next is made",
    )


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
class WorkerSection(Section):
    """The worker: readings from the stream to Postgres (README, "Worker")."""

    __slots__ = ()
    title = "Worker"

    worker_port: int = variable("WORKER_PORT", 3002, PORT, "HTTP port of the worker's probes")
    worker_batch: int = variable(
        "WORKER_BATCH",
        500,
        IntRange(1, 100_000),
        "readings stream entries (one per write of the service) read and stored per round",
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
        "deliveries of an entry before a failing batch of it becomes a dead letter",
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
    pod_keys_grace: int = variable(
        "POD_KEYS_GRACE",
        86_400,
        IntRange(1, 366 * 86_400),
        "seconds after a pod's last heartbeat before a worker removes its telemetry stream,"
        " heartbeat and sidecar state, and its idle consumers; more than HEARTBEAT_TTL",
    )


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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


@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
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
