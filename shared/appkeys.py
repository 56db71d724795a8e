"""Typed keys of what every PulseCal process keeps on its aiohttp application.

A program's own keys (the service's ingest state, the worker's state) live in its package.
"""

from aiohttp import ClientSession, web
from psycopg_pool import AsyncConnectionPool

from .health import HealthChecker
from .httpserver import HttpServer
from .logs import Logs
from .redisclient import RedisClient
from .runtime.probes import Probes
from .settings import HealthChecksSection
from .tracing import Tracing

__all__ = (
    "CHECKER",
    "HTTP_CLIENT",
    "HTTP_SERVER",
    "LOGS",
    "PG_POOL",
    "PROBES",
    "REDIS_AUX",
    "SETTINGS",
    "TRACING",
)

# What the shared resources read; each program's package re-exports the same key typed as
# its own settings class (``service/appkeys.py``, ``worker/appkeys.py``).
SETTINGS = web.AppKey("settings", HealthChecksSection)
# The redis-py client for everything but the service's group-committed writes: telemetry,
# heartbeats, health checks, the worker's stream reads, the sidecar's.
# With REDIS_CLUSTER it holds a ``RedisCluster`` (``shared/redisclient.py``).
REDIS_AUX: web.AppKey[RedisClient] = web.AppKey("redis_aux")
PG_POOL = web.AppKey("pg_pool", AsyncConnectionPool)
HTTP_CLIENT = web.AppKey("http_client", ClientSession)
CHECKER = web.AppKey("checker", HealthChecker)
TRACING = web.AppKey("tracing", Tracing)
# Only when the process set logging up (not in tests): for the Logstash drop count.
LOGS = web.AppKey("logs", Logs)
PROBES = web.AppKey("probes", Probes)
# Only when the process serves through the runtime (not under pytest-aiohttp's server).
HTTP_SERVER = web.AppKey("http_server", HttpServer)
