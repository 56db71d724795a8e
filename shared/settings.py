"""Configuration: every environment variable read once into one frozen, typed object."""

import dataclasses
import math
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

__all__ = ("Settings", "SettingsError", "load_settings", "load_settings_or_exit")

T = TypeVar("T")


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


def _env(name: str, default: Any, parse: Callable[[str], Any]) -> Any:
    return dataclasses.field(default=default, metadata={"env": name, "parse": parse})


_PORT = _int_in(1, 65535)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    # Network and identity.
    port: int = _env("PORT", 3001, _PORT)
    sidecar_port: int = _env("SIDECAR_PORT", 9464, _PORT)
    pod_name: str = _env("POD_NAME", "", _text)
    environment: str = _env("ENVIRONMENT", "development", _text)

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
    metrics_enabled: bool = _env("METRICS_ENABLED", True, _bool)
    tracing_enabled: bool = _env("TRACING_ENABLED", False, _bool)
    jaeger_endpoint: str | None = _env("JAEGER_ENDPOINT", None, _optional(_url("http", "https")))

    # Rate limiting.
    rate_limit_ttl: int = _env("RATE_LIMIT_TTL", 60, _int_in(1, 86_400))
    rate_limit_max: int = _env("RATE_LIMIT_MAX", 100, _int_in(1, 10_000_000))

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
    write_max_batch: int = _env("WRITE_MAX_BATCH", 256, _int_in(1, 10_000))
    write_max_pending: int = _env("WRITE_MAX_PENDING", 20_000, _int_in(1, 10_000_000))
    write_max_in_flight: int = _env("WRITE_MAX_IN_FLIGHT", 2, _int_in(1, 64))
    readings_max_backlog: int = _env("READINGS_MAX_BACKLOG", 1_000_000, _int_in(1, 1 << 40))
    backlog_check_interval: float = _env("BACKLOG_CHECK_INTERVAL", 1.0, _float_in(0.01, 60))
    idempotency_window: int = _env("IDEMPOTENCY_WINDOW", 128, _int_in(1, 100_000))
    idempotency_ttl: int = _env("IDEMPOTENCY_TTL", 86_400, _int_in(1, 30 * 86_400))
    retry_after: int = _env("RETRY_AFTER", 1, _int_in(1, 3600))
    ws_heartbeat: float = _env("WS_HEARTBEAT", 30.0, _float_in(1, 3600))
    shutdown_timeout: float = _env("SHUTDOWN_TIMEOUT", 10.0, _float_in(0, 300))

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
