"""Typed keys of what only the sidecar keeps on its application.

The keys every process shares (settings, the Redis client, the checker, tracing) are in
``shared/appkeys.py``. This module declares keys and imports no module that reads them.
"""

from aiohttp import web

from .consumer import TelemetryConsumer
from .health import HeartbeatWatch, PostgresProbe
from .metrics import MetricsView

__all__ = ("CONSUMER", "HEARTBEAT", "METRICS", "POSTGRES")

POSTGRES = web.AppKey("postgres", PostgresProbe)
HEARTBEAT = web.AppKey("heartbeat", HeartbeatWatch)
# Absent when METRICS_ENABLED=false: nothing is consumed then.
CONSUMER = web.AppKey("consumer", TelemetryConsumer)
METRICS = web.AppKey("metrics", MetricsView)
