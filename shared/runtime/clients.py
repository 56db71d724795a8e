"""The clients of a process, each made in one place, as cleanup contexts.

Each factory returns a ``cleanup_ctx`` generator that opens the client, stores it under its
``shared/appkeys.py`` key, traces it when the process does (``TRACING``) and closes it when
the app stops. Their timeouts come from ``HEALTH_CHECK_TIMEOUT``: a dependency that does not
answer within it is down for the checks, and a failed command is tried again by its caller.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from shared.appkeys import HTTP_CLIENT, PG_POOL, REDIS_AUX, SETTINGS, TRACING
from shared.redisclient import connect

__all__ = ("CleanupContext", "http_client", "postgres_pool", "redis_client")

CleanupContext = Callable[[web.Application], AsyncIterator[None]]
Configure = Callable[[AsyncConnection[Any]], Awaitable[None]]


def redis_client(*, blocking_ms: int = 0) -> CleanupContext:
    """The redis-py client (``REDIS_AUX``), of a cluster with ``REDIS_CLUSTER``
    (``shared/redisclient.py``); ``blocking_ms``: the longest blocking read the program makes
    on it (``XREAD ... BLOCK``), which the socket timeout must outlast."""

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        timeout = settings.health_check_timeout_ms / 1000
        client = connect(
            settings.redis_url,
            cluster=settings.redis_cluster,
            connect_timeout=timeout,
            socket_timeout=timeout + blocking_ms / 1000,
        )
        app[TRACING].instrument_redis(client)
        app[REDIS_AUX] = client
        yield
        await client.aclose()

    return redis_ctx


def postgres_pool(
    *,
    max_size: int,
    configure: Configure | None = None,
    check: bool = False,
) -> CleanupContext:
    """The Postgres pool (``PG_POOL``), opened without waiting: the process starts while
    Postgres is down and its checks say so. ``configure`` runs on every new connection
    (before the tracing's); ``check``: test a connection before handing it out."""

    async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        tracing = app[TRACING]

        async def configured(conn: AsyncConnection[Any]) -> None:
            if configure is not None:
                await configure(conn)
            await tracing.instrument_postgres(conn)

        pool: AsyncConnectionPool = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=settings.health_check_timeout_ms / 1000,
            configure=configured,
            check=AsyncConnectionPool.check_connection if check else None,
            kwargs={"connect_timeout": max(1, settings.health_check_timeout_ms // 1000)},
        )
        await pool.open(wait=False)
        app[PG_POOL] = pool
        yield
        await pool.close()

    return postgres_ctx


async def http_client(app: web.Application) -> AsyncIterator[None]:
    """The aiohttp client (``HTTP_CLIENT``): the AI service's calls and its check."""
    timeout = app[SETTINGS].health_check_timeout_ms / 1000
    async with app[TRACING].client_session(timeout) as session:
        app[HTTP_CLIENT] = session
        yield
