"""Typed keys of what only the sidecar keeps on its application.

The keys every process shares (the Redis client, the checker, tracing) are in
``shared/appkeys.py``. This module declares keys and imports no module that reads them.
"""

from typing import cast

from aiohttp import web

from shared import appkeys
from shared.settings import SidecarSettings

from .consumer import TelemetryConsumer
from .dependencies import DependencyCollector
from .health import HeartbeatWatch, PostgresProbe
from .metrics import MetricsView

__all__ = ("CONSUMER", "DEPENDENCIES", "HEARTBEAT", "METRICS", "POSTGRES", "SETTINGS")

# The shared key, under which the sidecar stores its SidecarSettings: the shared resources
# read it as the sections they need, the sidecar's own code as the whole class.
SETTINGS = cast("web.AppKey[SidecarSettings]", appkeys.SETTINGS)

POSTGRES = web.AppKey("postgres", PostgresProbe)
HEARTBEAT = web.AppKey("heartbeat", HeartbeatWatch)
# Absent when METRICS_ENABLED=false: nothing is consumed then.
CONSUMER = web.AppKey("consumer", TelemetryConsumer)
METRICS = web.AppKey("metrics", MetricsView)
# Absent too when DEPENDENCY_METRICS=false.
DEPENDENCIES = web.AppKey("dependencies", DependencyCollector)
