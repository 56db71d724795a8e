"""Configuration: every environment variable read once into one frozen, typed object."""

import dataclasses
import ipaddress
import math
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

__all__ = ("Settings", "SettingsError", "load_settings", "load_settings_or_exit")

T = TypeVar("T")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A variable holds a value the program cannot use; the message names it."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected an integer in [{lo}, {hi}]") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer in [{lo}, {hi}]")
        return value

    return parse


def _float_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number in [{lo}, {hi}]") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"expected a number in [{lo}, {hi}]")
        return value

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.hostname or parts.path):
            raise ValueError(f"expected a URL with scheme {' or '.join(schemes)}")
        return value

    return parse


def _optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    def parse_optional(raw: str) -> T | None:
        return None if raw.strip() == "" else parse(raw)

    return parse_optional


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _text(raw: str) -> str:
    return raw.strip()


def _key_prefix(raw: str) -> str:
    value = raw.strip()
    if not value or any(c in value for c in "{} \t\n"):
        raise ValueError("expected a non-empty prefix without braces or whitespace")
    return value


def _field_names(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if not all(n.replace("_", "").replace("-", "").isalnum() and n.isascii() for n in names):
        raise ValueError("expected comma-separated names of letters, digits, '_' and '-'")
    return names


_POLICIES = ("api", "ingest")


def _policy_names(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in _POLICIES]
    if unknown:
        raise ValueError(f"expected policy names among {', '.join(_POLICIES)}")
    return names


def _networks(raw: str) -> tuple[IpNetwork, ...]:
    try:
        return tuple(
            ipaddress.ip_network(n.strip(), strict=False) for n in raw.split(",") if n.strip()
        )
    except ValueError:
        raise ValueError("expected comma-separated IP networks (CIDR)") from None


def _env(name: str, default: Any, parse: Callable[[str], Any]) -> Any:
    return dataclasses.field(default=default, metadata={"env": name, "parse": parse})


_PORT = _int_in(1, 65535)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    # Network and identity.
    port: int = _env("PORT", 3001, _PORT)
    sidecar_port: int = _env("SIDECAR_PORT", 9464, _PORT)
    pod_name: str = _env("POD_NAME", "", _text)
    environment: str = _env("ENVIRONMENT", "production", _text)

    # The sidecar (README, "Sidecar"). The token is left out of the repr: settings get logged.
    metrics_token: str | None = dataclasses.field(
        default=None, repr=False, metadata={"env": "METRICS_TOKEN", "parse": _optional(_text)}
    )
    metrics_max_series: int = _env("METRICS_MAX_SERIES", 2000, _int_in(10, 1_000_000))
    sidecar_read_count: int = _env("SIDECAR_READ_COUNT", 200, _int_in(1, 100_000))
    sidecar_block_ms: int = _env("SIDECAR_BLOCK_MS", 1000, _int_in(1, 60_000))
    sidecar_checkpoint_interval: float = _env(
        "SIDECAR_CHECKPOINT_INTERVAL", 1.0, _float_in(0.01, 3600)
    )
    sidecar_state_ttl: int = _env("SIDECAR_STATE_TTL", 7 * 86_400, _int_in(60, 366 * 86_400))

    # Dependencies.
    redis_url: str = _env("REDIS_URL", "redis://127.0.0.1:6379/0", _url("redis", "rediss", "unix"))
    redis_key_prefix: str = _env("REDIS_KEY_PREFIX", "pulsecal:", _key_prefix)
    database_url: str = _env(
        "DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/postgres",
        _url("postgresql", "postgres"),
    )
    ai_service_url: str | None = _env("AI_SERVICE_URL", None, _optional(_url("http", "https")))

    # Logging, metrics, tracing (names kept from the original system).
    log_dir: str = _env("LOG_DIR", "./logs", _text)
    log_level: str = _env(
        "LOG_LEVEL", "info", _choice("trace", "debug", "info", "warning", "error", "critical")
    )
    enable_file_logging: bool = _env("ENABLE_FILE_LOGGING", False, _bool)
    logstash_host: str | None = _env("LOGSTASH_HOST", None, _optional(_text))
    logstash_port: int = _env("LOGSTASH_PORT", 5000, _PORT)
    log_retention_days: int = _env("LOG_RETENTION_DAYS", 14, _int_in(1, 3650))
    log_compression: str = _env("LOG_COMPRESSION", "none", _choice("none", "gz", "bz2", "xz"))
    log_redact_fields: tuple[str, ...] = _env(
        "LOG_REDACT_FIELDS",
        _field_names("authorization,cookie,token,password,passwd,secret,api_key,dsn,database_url"),
        _field_names,
    )
    logstash_buffer_lines: int = _env("LOGSTASH_BUFFER_LINES", 10_000, _int_in(1, 10_000_000))
    logstash_reconnect_max: float = _env("LOGSTASH_RECONNECT_MAX", 30.0, _float_in(0.01, 3600))
    metrics_enabled: bool = _env("METRICS_ENABLED", True, _bool)
    tracing_enabled: bool = _env("TRACING_ENABLED", False, _bool)
    jaeger_endpoint: str | None = _env("JAEGER_ENDPOINT", None, _optional(_url("http", "https")))
    # The standard OpenTelemetry variables (README, "Tracing"). The traces endpoint wins over
    # the base endpoint (+ /v1/traces), which wins over JAEGER_ENDPOINT.
    otel_exporter_otlp_traces_endpoint: str | None = _env(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None, _optional(_url("http", "https"))
    )
    otel_exporter_otlp_endpoint: str | None = _env(
        "OTEL_EXPORTER_OTLP_ENDPOINT", None, _optional(_url("http", "https"))
    )
    otel_exporter_otlp_timeout_ms: int = _env(
        "OTEL_EXPORTER_OTLP_TIMEOUT", 5000, _int_in(10, 600_000)
    )
    otel_traces_sampler: str = _env(
        "OTEL_TRACES_SAMPLER",
        "parentbased_traceidratio",
        _choice(
            "always_on",
            "always_off",
            "traceidratio",
            "parentbased_always_on",
            "parentbased_always_off",
            "parentbased_traceidratio",
        ),
    )
    otel_traces_sampler_arg: float = _env("OTEL_TRACES_SAMPLER_ARG", 0.01, _float_in(0.0, 1.0))
    otel_bsp_max_queue_size: int = _env("OTEL_BSP_MAX_QUEUE_SIZE", 2048, _int_in(1, 1_000_000))
    otel_bsp_schedule_delay_ms: int = _env("OTEL_BSP_SCHEDULE_DELAY", 2000, _int_in(1, 600_000))
    otel_bsp_max_export_batch_size: int = _env(
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, _int_in(1, 1_000_000)
    )

    # Rate limiting (README, "Rate limiting"). A *_BURST_MAX of 0 turns that window off.
    rate_limit_enabled: bool = _env("RATE_LIMIT_ENABLED", True, _bool)
    rate_limit_ttl: int = _env("RATE_LIMIT_TTL", 60, _int_in(1, 86_400))
    rate_limit_max: int = _env("RATE_LIMIT_MAX", 100, _int_in(1, 10_000_000))
    rate_limit_burst_max: int = _env("RATE_LIMIT_BURST_MAX", 20, _int_in(0, 10_000_000))
    rate_limit_burst_ttl: float = _env("RATE_LIMIT_BURST_TTL", 1.0, _float_in(0.01, 86_400))
    rate_limit_ingest_ttl: int = _env("RATE_LIMIT_INGEST_TTL", 60, _int_in(1, 86_400))
    rate_limit_ingest_max: int = _env("RATE_LIMIT_INGEST_MAX", 1000, _int_in(1, 10_000_000))
    rate_limit_ingest_burst_max: int = _env(
        "RATE_LIMIT_INGEST_BURST_MAX", 0, _int_in(0, 10_000_000)
    )
    rate_limit_ingest_burst_ttl: float = _env(
        "RATE_LIMIT_INGEST_BURST_TTL", 1.0, _float_in(0.01, 86_400)
    )
    rate_limit_shadow: tuple[str, ...] = _env("RATE_LIMIT_SHADOW", (), _policy_names)
    rate_limit_fail_mode: str = _env("RATE_LIMIT_FAIL_MODE", "open", _choice("open", "closed"))
    rate_limit_ws_close_after: int = _env("RATE_LIMIT_WS_CLOSE_AFTER", 20, _int_in(1, 1_000_000))
    trusted_proxies: tuple[IpNetwork, ...] = _env("TRUSTED_PROXIES", (), _networks)
    # The one header the trusted proxies write (docs/proxies.md); the other is ignored.
    trusted_proxy_header: str = _env(
        "TRUSTED_PROXY_HEADER", "x-forwarded-for", _choice("x-forwarded-for", "forwarded")
    )

    # Health checks: the timeout is in milliseconds, as in the original system.
    health_check_timeout_ms: int = _env("HEALTH_CHECK_TIMEOUT", 5000, _int_in(10, 120_000))
    health_check_interval: float = _env("HEALTH_CHECK_INTERVAL", 5.0, _float_in(0.05, 3600))
    memory_rss_threshold_mb: int = _env("MEMORY_RSS_THRESHOLD_MB", 1024, _int_in(16, 1 << 20))
    memory_heap_threshold_mb: int = _env("MEMORY_HEAP_THRESHOLD_MB", 768, _int_in(16, 1 << 20))
    disk_threshold_percent: float = _env("DISK_THRESHOLD_PERCENT", 0.9, _float_in(0.01, 1.0))

    # Ingestion.
    max_body_bytes: int = _env("MAX_BODY_BYTES", 256 * 1024, _int_in(1024, 64 << 20))
    token_refresh_interval: float = _env("TOKEN_REFRESH_INTERVAL", 5.0, _float_in(0.05, 3600))
    write_timeout: float = _env("WRITE_TIMEOUT", 2.0, _float_in(0.01, 60))
    write_max_batch: int = _env("WRITE_MAX_BATCH", 16, _int_in(1, 10_000))
    write_max_pending: int = _env("WRITE_MAX_PENDING", 20_000, _int_in(1, 10_000_000))
    write_max_in_flight: int = _env("WRITE_MAX_IN_FLIGHT", 8, _int_in(1, 64))
    readings_max_backlog: int = _env("READINGS_MAX_BACKLOG", 1_000_000, _int_in(1, 1 << 40))
    backlog_check_interval: float = _env("BACKLOG_CHECK_INTERVAL", 1.0, _float_in(0.01, 60))
    idempotency_window: int = _env("IDEMPOTENCY_WINDOW", 128, _int_in(1, 100_000))
    idempotency_ttl: int = _env("IDEMPOTENCY_TTL", 86_400, _int_in(1, 30 * 86_400))

    # The worker, its alert rules and analysis queue, the operator API (README, "Worker").
    worker_port: int = _env("WORKER_PORT", 3002, _PORT)
    worker_batch: int = _env("WORKER_BATCH", 500, _int_in(1, 100_000))
    worker_block_ms: int = _env("WORKER_BLOCK_MS", 1000, _int_in(1, 60_000))
    worker_claim_idle: float = _env("WORKER_CLAIM_IDLE", 60.0, _float_in(0.05, 86_400))
    worker_dead_letter_after: int = _env("WORKER_DEAD_LETTER_AFTER", 5, _int_in(1, 1000))
    worker_retry_max: float = _env("WORKER_RETRY_MAX", 5.0, _float_in(0.01, 600))
    worker_trim_interval: float = _env("WORKER_TRIM_INTERVAL", 5.0, _float_in(0.01, 3600))
    dead_letter_maxlen: int = _env("DEAD_LETTER_MAXLEN", 100_000, _int_in(10, 100_000_000))
    readings_partitions_ahead: int = _env("READINGS_PARTITIONS_AHEAD", 7, _int_in(1, 366))
    admin_token: str | None = dataclasses.field(
        default=None, repr=False, metadata={"env": "ADMIN_TOKEN", "parse": _optional(_text)}
    )
    alert_hr_high: float = _env("ALERT_HR_HIGH", 120.0, _float_in(1, 400))
    alert_hr_low: float = _env("ALERT_HR_LOW", 40.0, _float_in(0, 400))
    alert_hr_duration: float = _env("ALERT_HR_DURATION", 60.0, _float_in(0, 86_400))
    alert_spo2_low: float = _env("ALERT_SPO2_LOW", 90.0, _float_in(0, 100))
    alert_spo2_duration: float = _env("ALERT_SPO2_DURATION", 30.0, _float_in(0, 86_400))
    alert_max_gap: float = _env("ALERT_MAX_GAP", 10.0, _float_in(0, 3600))
    alert_lateness: float = _env("ALERT_LATENESS", 5.0, _float_in(0, 3600))
    alert_silence_after: float = _env("ALERT_SILENCE_AFTER", 120.0, _float_in(0, 30 * 86_400))
    analysis_window: float = _env("ANALYSIS_WINDOW", 30.0, _float_in(1, 3600))
    analysis_grace: float = _env("ANALYSIS_GRACE", 2.0, _float_in(0, 600))
    analysis_concurrency: int = _env("ANALYSIS_CONCURRENCY", 4, _int_in(1, 1000))
    analysis_timeout: float = _env("ANALYSIS_TIMEOUT", 10.0, _float_in(0.01, 600))
    analysis_retries: int = _env("ANALYSIS_RETRIES", 3, _int_in(0, 100))
    analysis_backoff: float = _env("ANALYSIS_BACKOFF", 0.5, _float_in(0.001, 600))
    analysis_backoff_max: float = _env("ANALYSIS_BACKOFF_MAX", 10.0, _float_in(0.001, 3600))
    analysis_breaker_failures: int = _env("ANALYSIS_BREAKER_FAILURES", 5, _int_in(1, 10_000))
    analysis_breaker_reset: float = _env("ANALYSIS_BREAKER_RESET", 15.0, _float_in(0.01, 3600))
    analysis_max_age: float = _env("ANALYSIS_MAX_AGE", 600.0, _float_in(1, 30 * 86_400))
    retry_after: int = _env("RETRY_AFTER", 1, _int_in(1, 3600))
    ws_heartbeat: float = _env("WS_HEARTBEAT", 30.0, _float_in(1, 3600))
    shutdown_timeout: float = _env("SHUTDOWN_TIMEOUT", 10.0, _float_in(0, 300))

    # HTTP connections of the service and the sidecar (docs/protocol-limits.md), in seconds,
    # and who sees health details (docs/health.md; unset: METRICS_TOKEN's holder).
    http_header_timeout: float = _env("HTTP_HEADER_TIMEOUT", 10.0, _float_in(0.05, 3600))
    http_body_timeout: float = _env("HTTP_BODY_TIMEOUT", 30.0, _float_in(0.05, 3600))
    http_keepalive_timeout: float = _env("HTTP_KEEPALIVE_TIMEOUT", 75.0, _float_in(0.05, 3600))
    ws_handshake_timeout: float = _env("WS_HANDSHAKE_TIMEOUT", 5.0, _float_in(0.05, 600))
    health_detail_token: str | None = dataclasses.field(
        default=None,
        repr=False,
        metadata={"env": "HEALTH_DETAIL_TOKEN", "parse": _optional(_text)},
    )

    # Telemetry for the sidecar.
    telemetry_flush_interval: float = _env("TELEMETRY_FLUSH_INTERVAL", 0.2, _float_in(0.01, 60))
    telemetry_buffer_max: int = _env("TELEMETRY_BUFFER_MAX", 100_000, _int_in(100, 10_000_000))
    telemetry_stream_maxlen: int = _env("TELEMETRY_STREAM_MAXLEN", 10_000, _int_in(10, 10_000_000))
    heartbeat_interval: float = _env("HEARTBEAT_INTERVAL", 2.0, _float_in(0.05, 600))
    heartbeat_ttl: int = _env("HEARTBEAT_TTL", 10, _int_in(1, 3600))

    @property
    def pod(self) -> str:
        """The pod's name, or the host's when not running under Kubernetes."""
        return self.pod_name or socket.gethostname()


def load_settings(environ: Mapping[str, str]) -> Settings:
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        name = field.metadata["env"]
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            values[field.name] = field.metadata["parse"](raw)
        except ValueError as e:
            shown = raw if len(raw) <= 60 else raw[:57] + "..."
            raise SettingsError(f"{name}={shown!r}: {e}") from e
    settings = Settings(**values)
    if settings.heartbeat_ttl <= settings.heartbeat_interval:
        raise SettingsError(
            f"HEARTBEAT_TTL={settings.heartbeat_ttl}: expected more than "
            f"HEARTBEAT_INTERVAL ({settings.heartbeat_interval})"
        )
    return settings


def load_settings_or_exit(environ: Mapping[str, str], program: str) -> Settings:
    try:
        return load_settings(environ)
    except SettingsError as e:
        _exit_with(f"{program}: invalid configuration: {e}")


def _exit_with(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)
