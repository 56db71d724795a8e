"""The dependency checks behind the service's and the worker's health probes, and the
figures their heartbeats report of their clients (the clients: ``shared/runtime/clients.py``)."""

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from .appkeys import CHECKER, HTTP_CLIENT, PG_POOL, REDIS_AUX, SETTINGS
from .health import (
    Check,
    HealthChecker,
    ai_services_check,
    disk_check,
    redis_check,
    threshold_check,
)
from .reporting import process_memory
from .settings import HealthChecksSection

__all__ = ("dependency_checker", "health_checks", "pool_stats", "static_details")


def health_checks(app: web.Application) -> dict[str, Check]:
    settings = app[SETTINGS]
    pool = app[PG_POOL]
    redis = app[REDIS_AUX]
    session = app[HTTP_CLIENT]

    async def database() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")

    mb = 1024 * 1024
    return {
        "database": database,
        "redis": redis_check(redis),
        "ai-services": ai_services_check(settings.ai_service_url, session),
        "memory_heap": threshold_check(
            lambda: process_memory()[1] // mb, settings.memory_heap_threshold_mb, "MB"
        ),
        "memory_rss": threshold_check(
            lambda: process_memory()[0] // mb, settings.memory_rss_threshold_mb, "MB"
        ),
        "disk": disk_check(settings.log_dir, settings.disk_threshold_percent),
    }


def static_details(settings: HealthChecksSection) -> dict[str, dict[str, Any]]:
    redis = urlsplit(settings.redis_url)
    details: dict[str, dict[str, Any]] = {
        "redis": {"host": redis.hostname or "localhost", "port": redis.port or 6379}
    }
    if settings.ai_service_url is not None:
        details["ai-services"] = {"url": settings.ai_service_url}
    return details


def pool_stats(pool: AsyncConnectionPool) -> dict[str, int]:
    """The Postgres pool as the heartbeat reports it: size, available, waiting."""
    stats = pool.get_stats()
    return {
        "size": stats.get("pool_size", 0),
        "available": stats.get("pool_available", 0),
        "waiting": stats.get("requests_waiting", 0),
    }


def dependency_checker(
    app: web.Application, extra: Mapping[str, Check] | None = None
) -> HealthChecker:
    """The background checker of ``health_checks`` and a program's ``extra`` checks, under
    ``CHECKER``: what the probes and the heartbeat of the service and the worker read."""
    settings = app[SETTINGS]
    checker = HealthChecker(
        {**health_checks(app), **(extra or {})},
        timeout=settings.health_check_timeout_ms / 1000,
        interval=settings.health_check_interval,
        static_details=static_details(settings),
    )
    app[CHECKER] = checker
    return checker
