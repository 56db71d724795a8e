"""Alert queries both the service (``GET /alerts``) and the worker (the open count) run.

The worker writes the ``alerts`` table (``worker/alerts.py``); its columns are in
``shared/schema.py``.
"""

import datetime as dt
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

__all__ = ("count_open_alerts", "list_alerts")


async def count_open_alerts(pool: AsyncConnectionPool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM alerts WHERE cleared_at IS NULL")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


_LIST = """
    SELECT id, device_id, rule, metric, above, threshold, value, message, started_at,
        opened_at, cleared_at, cleared_value
    FROM alerts
    WHERE opened_at >= %(since)s
        AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
        AND (NOT %(open_only)s OR cleared_at IS NULL)
    ORDER BY opened_at DESC, id DESC
    LIMIT %(limit)s
"""


async def list_alerts(
    conn: psycopg.AsyncConnection[TupleRow],
    *,
    since: dt.datetime,
    device_id: str | None,
    open_only: bool,
    limit: int,
) -> list[dict[str, Any]]:
    cur = await conn.execute(
        _LIST, {"since": since, "device_id": device_id, "open_only": open_only, "limit": limit}
    )
    out: list[dict[str, Any]] = []
    for row in await cur.fetchall():
        (alert_id, device, rule, metric, above, threshold, value, message, started_at) = row[:9]
        opened_at, cleared_at, cleared_value = row[9:]
        out.append(
            {
                "id": alert_id,
                "device_id": device,
                "rule": rule,
                "metric": metric,
                "condition": ("above" if above else "below"),
                "threshold": threshold,
                "value": value,
                "message": message,
                "open": cleared_at is None,
                "started_at": started_at,
                "opened_at": opened_at,
                "cleared_at": cleared_at,
                "cleared_value": cleared_value,
            }
        )
    return out
