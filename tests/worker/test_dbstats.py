"""The database's figures a worker carries in its heartbeat, measured on a real Postgres."""

import datetime
import time
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from shared.schema import upgrade_schema
from tests.support.env import POSTGRES_URL
from worker.dbstats import measure_postgres, state_name


@pytest.fixture
async def pool() -> AsyncIterator[AsyncConnectionPool]:
    """A migrated schema of this test's own, so it alone decides the partitions."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await upgrade_schema(conn)
    async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as opened:
        yield opened
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


async def test_the_partitions_ahead_and_the_oldest_day_kept(pool: AsyncConnectionPool) -> None:
    today = _utc_today()
    async with pool.connection() as conn:
        # The migration made yesterday to 7 days ahead; keep 3 days back, drop the last two.
        await conn.execute(
            "SELECT readings_ensure_partitions(%s, 3)", (today - datetime.timedelta(days=3),)
        )
        for days in (6, 7):
            day = today + datetime.timedelta(days=days)
            await conn.execute(f"DROP TABLE readings_{day:%Y%m%d}")
        await conn.commit()

    before = time.time_ns() // 1_000_000
    stats = await measure_postgres(pool)

    assert stats.readings_partitions_ahead == 5
    oldest = datetime.datetime.combine(
        today - datetime.timedelta(days=3), datetime.time(), datetime.UTC
    )
    assert stats.readings_oldest_day_ms == int(oldest.timestamp() * 1000)
    assert stats.measured_ms >= before


async def test_connections_by_state_and_the_database_size(pool: AsyncConnectionPool) -> None:
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as idle_in_transaction:
        await idle_in_transaction.execute("SELECT 1")  # a transaction left open

        stats = await measure_postgres(pool)

    # The measuring query itself is active; the connection above idles in its transaction.
    assert stats.connections.get("active", 0) >= 1
    assert stats.connections.get("idle_in_transaction", 0) >= 1
    assert all(name == state_name(name) for name in stats.connections)
    assert stats.database_bytes > 1_000_000


def test_state_names_are_label_values_of_a_fixed_spelling() -> None:
    assert state_name("idle in transaction (aborted)") == "idle_in_transaction_aborted"
    assert state_name("fastpath function call") == "fastpath_function_call"
    assert state_name("active") == "active"
    assert state_name(None) == "unknown"
    assert state_name("") == "unknown"
