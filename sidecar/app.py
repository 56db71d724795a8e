"""The sidecar's application factory."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from loguru import logger
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from shared.health import HealthChecker
from shared.httpserver import expect_continue, server_header
from shared.keys import Keys
from shared.settings import SidecarSettings
from shared.tasks import cancel_and_wait
from shared.tracing import Tracing

from .appkeys import (
    CHECKER,
    CONSUMER,
    HEARTBEAT,
    HTTP_CLIENT,
    METRICS,
    POSTGRES,
    REDIS,
    SETTINGS,
    STARTED_AT,
    TRACING,
)
from .consumer import TelemetryConsumer
from .dashboard import dashboard, dashboard_live, sign_in
from .health import HeartbeatWatch, PostgresProbe, health, health_checks, liveness, static_details
from .metrics import MetricsView, metrics_handler

__all__ = ("create_app",)

_HERE = Path(__file__).parent
_FINAL_SAVE_TIMEOUT = 3.0


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    timeout = settings.health_check_timeout_ms / 1000
    app[REDIS] = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=timeout,
        # A blocking XREAD waits up to SIDECAR_BLOCK_MS for an answer.
        socket_timeout=settings.sidecar_block_ms / 1000 + timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )
    app[TRACING].instrument_redis(app[REDIS])
    yield
    await app[REDIS].aclose()


async def _postgres(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    probe = PostgresProbe(
        settings.database_url, connect_timeout=max(1, settings.health_check_timeout_ms // 1000)
    )
    app[POSTGRES] = probe
    yield
    await probe.close()


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    timeout = app[SETTINGS].health_check_timeout_ms / 1000
    async with app[TRACING].client_session(timeout) as session:
        app[HTTP_CLIENT] = session
        yield


async def _health(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = Keys(settings.redis_key_prefix)
    watch = HeartbeatWatch(app[REDIS], keys.heartbeat(settings.pod), ttl=settings.heartbeat_ttl)
    app[HEARTBEAT] = watch
    checker = HealthChecker(
        health_checks(
            settings,
            redis=app[REDIS],
            watch=watch,
            postgres=app[POSTGRES],
            http=app[HTTP_CLIENT],
        ),
        timeout=settings.health_check_timeout_ms / 1000,
        interval=settings.health_check_interval,
        static_details=static_details(settings),
    )
    app[CHECKER] = checker
    task = asyncio.create_task(checker.run(), name="checker")
    yield
    await cancel_and_wait([task])


async def _telemetry(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = Keys(settings.redis_key_prefix)
    consumer = TelemetryConsumer(
        app[REDIS],
        stream=keys.telemetry(settings.pod),
        state_key=keys.sidecar_state(settings.pod),
        max_series=settings.metrics_max_series,
        read_count=settings.sidecar_read_count,
        block_ms=settings.sidecar_block_ms,
        checkpoint_interval=settings.sidecar_checkpoint_interval,
        state_ttl=settings.sidecar_state_ttl,
        save_timeout=min(1.0, settings.health_check_timeout_ms / 1000),
    )
    app[CONSUMER] = consumer
    app[METRICS] = MetricsView()
    # Serve /metrics from the first request when Redis answers; if it does not, start
    # anyway (health and the dashboard matter most then) and keep trying in the background.
    try:
        async with asyncio.timeout(settings.health_check_timeout_ms / 1000):
            await consumer.load()
    except (RedisError, OSError, TimeoutError) as e:
        logger.warning("telemetry state not loaded at startup, retrying in background: {}", e)
    task = asyncio.create_task(consumer.run(), name="telemetry")
    yield
    await cancel_and_wait([task])
    # Everything consumed so far is saved, so the next sidecar goes on from here.
    saved = False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_FINAL_SAVE_TIMEOUT):
            saved = await consumer.save()
    if consumer.aggregator is not None:
        logger.info(
            "telemetry {} at entry {} ({} records)",
            "saved" if saved else "NOT saved",
            consumer.aggregator.last_id,
            consumer.aggregator.records,
        )


def create_app(settings: SidecarSettings, *, tracing: Tracing | None = None) -> web.Application:
    """The sidecar. ``tracing``: the process's (its Redis and HTTP clients); none: untraced."""
    app = web.Application()
    app[SETTINGS] = settings
    app[TRACING] = tracing if tracing is not None else Tracing(provider=None)
    app[STARTED_AT] = time.time()
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.cleanup_ctx.extend([app[TRACING].export_ctx, _redis, _postgres, _http_client, _health])
    app.on_response_prepare.append(server_header)
    router = app.router
    # Every route meets Expect: 100-continue and refuses any other expectation as JSON
    # (expect_continue), as the service's do.
    if settings.metrics_enabled:
        app.cleanup_ctx.append(_telemetry)
        router.add_get("/metrics", metrics_handler, expect_handler=expect_continue)
    router.add_get("/", dashboard, expect_handler=expect_continue)
    router.add_get("/dashboard/live", dashboard_live, expect_handler=expect_continue)
    router.add_post("/signin", sign_in, expect_handler=expect_continue)
    router.add_get("/health", health, expect_handler=expect_continue)
    router.add_get("/health/liveness", liveness, expect_handler=expect_continue)
    router.add_static(
        "/static", _HERE / "static", append_version=False, expect_handler=expect_continue
    )
    return app
