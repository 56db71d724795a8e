"""The ingest routes: ``POST /ingestion/ppg`` (``http``) and ``GET /ingestion/ws`` (``ws``).

Each reads top to bottom in the order a batch goes through it: authenticate, decode, the
gates, store, ack. The device's rate limit is a gate decided inside the write (one Redis
call for both, ``service/store.py``), so its answer is read from the write's result before
the ack; ``service/ratelimit.py`` turns it into the answer. What both routes do the same
way is in ``common``.

A batch is acknowledged (202 or ``{"ack": seq}``) only after Redis has accepted it. The
stored entry is the request body exactly as received (it has just been validated), so the
hot path never re-encodes samples.
"""

from .http import HTTP_ROUTE, ingest_http
from .ws import MAX_UNANSWERED, WS_ROUTE, DeviceSocket, ingest_ws

__all__ = ("HTTP_ROUTE", "MAX_UNANSWERED", "WS_ROUTE", "DeviceSocket", "ingest_http", "ingest_ws")
