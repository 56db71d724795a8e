"""Typed keys of everything the sidecar keeps on its application."""

from typing import TYPE_CHECKING

from aiohttp import ClientSession, web
from redis.asyncio import Redis

from shared.health import HealthChecker
from shared.settings import SidecarSettings
from shared.tracing import Tracing

if TYPE_CHECKING:
    from .consumer import TelemetryConsumer
    from .health import HeartbeatWatch, PostgresProbe
    from .metrics import MetricsView

__all__ = (
    "CHECKER",
    "CONSUMER",
    "HEARTBEAT",
    "HTTP_CLIENT",
    "METRICS",
    "POSTGRES",
    "REDIS",
    "SETTINGS",
    "STARTED_AT",
    "TRACING",
)

SETTINGS = web.AppKey("settings", SidecarSettings)
STARTED_AT = web.AppKey("started_at", float)
REDIS = web.AppKey("redis", Redis)
HTTP_CLIENT = web.AppKey("http_client", ClientSession)
CHECKER = web.AppKey("checker", HealthChecker)
TRACING = web.AppKey("tracing", Tracing)
# Forward references: those modules' handlers import this one.
POSTGRES: web.AppKey["PostgresProbe"] = web.AppKey("postgres")
HEARTBEAT: web.AppKey["HeartbeatWatch"] = web.AppKey("heartbeat")
# Absent when METRICS_ENABLED=false: nothing is consumed then.
CONSUMER: web.AppKey["TelemetryConsumer"] = web.AppKey("consumer")
METRICS: web.AppKey["MetricsView"] = web.AppKey("metrics")
