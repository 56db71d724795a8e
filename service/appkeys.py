"""Typed keys of what only the ingestion service keeps on its application.

The keys every process shares (settings, clients, checker, tracing) are in ``shared/appkeys.py``.
"""

from aiohttp import web

from .fastpath.resp import RespConnection
from .state import IngestState

__all__ = ("INGEST", "REDIS_DATA")

# The data connection carries only group-committed writes, so telemetry, heartbeats and
# health checks never queue in front of a device's batch.
REDIS_DATA = web.AppKey("redis_data", RespConnection)
INGEST = web.AppKey("ingest", IngestState)
