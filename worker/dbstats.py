"""The database's figures a worker carries in its heartbeat (``PostgresStats``), for the
sidecar to export: connections by state, size, and the daily partitions of ``readings``.

Three catalog queries on one pooled connection, every ``INTERVAL`` seconds: no table is
scanned (``pg_stat_activity`` has a row per backend, ``pg_inherits`` one per partition).
"""

import re
import time

from psycopg_pool import AsyncConnectionPool

from shared.telemetry import PostgresStats

__all__ = ("INTERVAL", "measure_postgres", "state_name")

INTERVAL = 30.0

_CONNECTIONS = """
SELECT state, count(*) FROM pg_stat_activity
WHERE datname = current_database() GROUP BY state
"""
# The daily partitions (readings_YYYYMMDD), against today in UTC as the worker creates them.
_PARTITIONS = """
WITH days AS (
    SELECT to_date(substr(c.relname, 10), 'YYYYMMDD') AS day
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = to_regclass('readings') AND c.relname ~ '^readings_[0-9]{8}$'
)
SELECT count(*) FILTER (WHERE day > (now() AT TIME ZONE 'UTC')::date),
       (extract(epoch FROM min(day)::timestamp) * 1000)::bigint
FROM days
"""
_SIZE = "SELECT pg_database_size(current_database())"


def state_name(state: str | None) -> str:
    """``idle in transaction (aborted)`` -> ``idle_in_transaction_aborted``; None -> unknown."""
    if not state:
        return "unknown"
    return re.sub(r"[^a-z0-9]+", "_", state.lower()).strip("_") or "unknown"


async def measure_postgres(pool: AsyncConnectionPool) -> PostgresStats:
    async with pool.connection() as conn:
        connections: dict[str, int] = {}
        for state, count in await (await conn.execute(_CONNECTIONS)).fetchall():
            name = state_name(state)
            connections[name] = connections.get(name, 0) + int(count)
        row = await (await conn.execute(_PARTITIONS)).fetchone()
        ahead, oldest_ms = (int(row[0] or 0), int(row[1] or 0)) if row else (0, 0)
        size = await (await conn.execute(_SIZE)).fetchone()
        # Catalog reads only: end the transaction rather than hand back an idle one.
        await conn.rollback()
    return PostgresStats(
        measured_ms=time.time_ns() // 1_000_000,
        connections=connections,
        database_bytes=int(size[0]) if size else 0,
        readings_partitions_ahead=ahead,
        readings_oldest_day_ms=oldest_ms,
    )
