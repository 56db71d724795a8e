"""Typed keys of everything the service keeps on its application."""

from aiohttp import ClientSession, web
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from shared.health import HealthChecker
from shared.logs import Logs
from shared.settings import Settings
from shared.tracing import Tracing

from .resp import RespConnection
from .state import IngestState
from .workerstate import WorkerState

__all__ = (
    "CHECKER",
    "HTTP_CLIENT",
    "INGEST",
    "LOGS",
    "PG_POOL",
    "REDIS_AUX",
    "REDIS_DATA",
    "SETTINGS",
    "WORKER",
)

SETTINGS = web.AppKey("settings", Settings)
# The data connection carries only group-committed writes, so telemetry, heartbeats and
# health checks never queue in front of a device's batch.
REDIS_DATA = web.AppKey("redis_data", RespConnection)
REDIS_AUX = web.AppKey("redis_aux", Redis)
PG_POOL = web.AppKey("pg_pool", AsyncConnectionPool)
HTTP_CLIENT = web.AppKey("http_client", ClientSession)
INGEST = web.AppKey("ingest", IngestState)
CHECKER = web.AppKey("checker", HealthChecker)
TRACING = web.AppKey("tracing", Tracing)
# Only when the process set logging up (not in tests): for the Logstash drop count.
LOGS = web.AppKey("logs", Logs)
# pulsecal-worker's own (it uses SETTINGS, PG_POOL, REDIS_AUX, HTTP_CLIENT, CHECKER too).
WORKER = web.AppKey("worker", WorkerState)
