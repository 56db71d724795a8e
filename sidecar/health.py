"""Aggregated health: the pod's service (by its heartbeat) plus the sidecar's own checks.

Every check runs in the background ``HealthChecker`` (``shared/health.py``), bounded by
``HEALTH_CHECK_TIMEOUT``; ``/health`` (``shared/runtime``'s probe) and the dashboard only
read the cached results. Anyone gets the verdict; the operator the details
(``shared/access.py``).
"""

import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec
import psycopg
from aiohttp import ClientSession

from shared.health import Check, CheckFailedError, ai_services_check, disk_check, redis_check
from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.settings import SidecarSettings
from shared.telemetry import Heartbeat, HeartbeatBase, ServiceHeartbeat, decode_heartbeat

from .process import own_process

__all__ = (
    "SERVICE_ID",
    "HeartbeatWatch",
    "PostgresProbe",
    "as_service",
    "health_checks",
    "static_details",
)

SERVICE_ID = "pulsecal-sidecar"
_MB = 1024 * 1024


def as_service(heartbeat: Heartbeat) -> ServiceHeartbeat:
    """The heartbeat with the service's figures: a worker's own, with the service's figures
    at 0, which is how the page and the series beside a worker have always shown them."""
    if isinstance(heartbeat, ServiceHeartbeat):
        return heartbeat
    return ServiceHeartbeat(
        **{name: getattr(heartbeat, name) for name in HeartbeatBase.__struct_fields__}
    )


class HeartbeatWatch:
    """The service's last heartbeat as read from Redis, and whether it is still fresh.

    A heartbeat older than ``HEARTBEAT_TTL`` means the service is down: the key's own TTL
    removes it at the same age, the age check covers a key written without one.
    """

    def __init__(self, redis: RedisClient, key: str, *, ttl: float) -> None:
        self._redis = redis
        self.key = key
        self.ttl = ttl
        self.latest: Heartbeat | None = None
        self.fetched_at = 0.0

    async def refresh(self) -> Heartbeat | None:
        raw = await self._redis.get(self.key)
        if isinstance(raw, str):  # only with decode_responses, which this client has not
            raw = raw.encode()
        try:
            self.latest = None if raw is None else decode_heartbeat(raw)
        except msgspec.DecodeError:
            self.latest = None
        self.fetched_at = time.time()
        return self.latest

    def age_s(self, heartbeat: Heartbeat, now: float) -> float:
        return max(0.0, now - heartbeat.sent_ms / 1000)

    def fresh(self, now: float | None = None) -> Heartbeat | None:
        """The last heartbeat if it is fresh now, else None."""
        heartbeat = self.latest
        if heartbeat is None:
            return None
        if now is None:
            now = time.time()
        return heartbeat if self.age_s(heartbeat, now) <= self.ttl else None

    async def check(self) -> Mapping[str, Any]:
        try:
            heartbeat = await self.refresh()
        except REDIS_ERRORS as e:
            raise CheckFailedError(f"unknown: its heartbeat cannot be read from Redis ({e})") from e
        if heartbeat is None:
            raise CheckFailedError(
                f"no heartbeat (none written in the last {self.ttl:g} s: the service is not"
                " running or cannot reach Redis)"
            )
        now = time.time()
        age = self.age_s(heartbeat, now)
        if age > self.ttl:
            raise CheckFailedError(f"stale heartbeat: the last one is {age:.1f} s old")
        if heartbeat.draining:
            raise CheckFailedError("shutting down (draining)")
        if not heartbeat.ready:
            raise CheckFailedError("not ready (see the service's /health/readiness)")
        return {
            "pid": heartbeat.pid,
            "version": heartbeat.version,
            "uptime_s": round(now - heartbeat.started_ms / 1000, 1),
            "heartbeat_age_s": round(age, 2),
            "ws_connections": as_service(heartbeat).ws_connections,
            "loop_lag_ms": heartbeat.loop_lag_ms,
        }


class PostgresProbe:
    """``SELECT 1`` on one kept connection, reconnecting when it broke.

    A fresh connection after a failure says why it failed ("connection refused", "password
    authentication failed"), which a pool waiting out its own timeout would not.
    """

    def __init__(self, url: str, *, connect_timeout: int) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def __call__(self) -> None:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._conn = None
            conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=self._connect_timeout
            )
            self._conn = conn
        try:
            await conn.execute("SELECT 1")
        except BaseException:
            self._conn = None
            await conn.close()
            raise

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _memory_check(watch: HeartbeatWatch, threshold_mb: int, measure: str) -> Check:
    """The service's figure (from its fresh heartbeat) and the sidecar's against one threshold."""

    async def check() -> Mapping[str, Any]:
        own = own_process()
        sidecar_mb = (own.heap_bytes if measure == "heap" else own.rss_bytes) // _MB
        heartbeat = watch.fresh()
        service_mb = None
        if heartbeat is not None:
            service_bytes = heartbeat.heap_bytes if measure == "heap" else heartbeat.rss_bytes
            service_mb = service_bytes // _MB
        over = [
            f"{who} uses {mb} MB"
            for who, mb in (("the service", service_mb), ("the sidecar", sidecar_mb))
            if mb is not None and mb > threshold_mb
        ]
        if over:
            raise CheckFailedError(f"{' and '.join(over)}, threshold {threshold_mb} MB")
        return {"service_mb": service_mb, "sidecar_mb": sidecar_mb, "threshold_mb": threshold_mb}

    return check


def health_checks(
    settings: SidecarSettings,
    *,
    redis: RedisClient,
    watch: HeartbeatWatch,
    postgres: PostgresProbe,
    http: ClientSession,
) -> dict[str, Check]:
    return {
        "service": watch.check,
        "database": postgres,
        "redis": redis_check(redis),
        "ai-services": ai_services_check(settings.ai_service_url, http),
        "memory_heap": _memory_check(watch, settings.memory_heap_threshold_mb, "heap"),
        "memory_rss": _memory_check(watch, settings.memory_rss_threshold_mb, "rss"),
        "disk": disk_check(settings.log_dir, settings.disk_threshold_percent),
    }


def static_details(settings: SidecarSettings) -> dict[str, dict[str, Any]]:
    redis = urlsplit(settings.redis_url)
    database = urlsplit(settings.database_url)
    details: dict[str, dict[str, Any]] = {
        "service": {"pod": settings.pod},
        "redis": {"host": redis.hostname or "localhost", "port": redis.port or 6379},
        # Host and port only: the URL may carry a password.
        "database": {"host": database.hostname or "localhost", "port": database.port or 5432},
    }
    if settings.ai_service_url is not None:
        details["ai-services"] = {"url": settings.ai_service_url}
    return details
