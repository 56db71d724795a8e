"""Typed keys of what only the ingestion service keeps on its application.

The keys every process shares (clients, checker, tracing) are in ``shared/appkeys.py``.
"""

from typing import cast

from aiohttp import web

from shared import appkeys
from shared.settings import ServiceSettings

from .fastpath.resp import RespConnection
from .state import IngestState

__all__ = ("INGEST", "REDIS_DATA", "SETTINGS")

# The shared key, under which the service stores its ServiceSettings: the shared resources
# read it as the sections they need, the service's own code as the whole class.
SETTINGS = cast("web.AppKey[ServiceSettings]", appkeys.SETTINGS)

# The data connection carries only group-committed writes, so telemetry, heartbeats and
# health checks never queue in front of a device's batch.
# The write connections, one per readings partition (``service/partitions.py``).
REDIS_DATA = web.AppKey("redis_data", tuple[RespConnection, ...])
INGEST = web.AppKey("ingest", IngestState)
