"""The sidecar's application factory."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from loguru import logger

from shared.appkeys import CHECKER, HTTP_CLIENT, LOGS, PROBES, REDIS_AUX, TRACING
from shared.health import HealthChecker
from shared.httpserver import expect_continue, server_header
from shared.keys import Keys
from shared.logs import Logs
from shared.redisclient import REDIS_ERRORS
from shared.runtime.clients import http_client, redis_client
from shared.runtime.probes import Probes
from shared.settings import SidecarSettings
from shared.tasks import cancel_and_wait
from shared.tracing import Tracing

from .appkeys import CONSUMER, DEPENDENCIES, HEARTBEAT, METRICS, POSTGRES, SETTINGS
from .consumer import TelemetryConsumer
from .dashboard import dashboard, dashboard_live, sign_in
from .dependencies import DependencyCollector
from .health import SERVICE_ID, HeartbeatWatch, PostgresProbe, health_checks, static_details
from .metrics import MetricsView
from .scrape import metrics_handler

__all__ = ("create_app",)

_HERE = Path(__file__).parent
_FINAL_SAVE_TIMEOUT = 3.0


def _blocking_read_ms(settings: SidecarSettings) -> int:
    # A blocking XREAD waits up to SIDECAR_BLOCK_MS for an answer.
    return settings.sidecar_block_ms


async def _postgres(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    probe = PostgresProbe(
        settings.database_url, connect_timeout=max(1, settings.health_check_timeout_ms // 1000)
    )
    app[POSTGRES] = probe
    yield
    await probe.close()


async def _health(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = Keys(settings.redis_key_prefix)
    watch = HeartbeatWatch(app[REDIS_AUX], keys.heartbeat(settings.pod), ttl=settings.heartbeat_ttl)
    app[HEARTBEAT] = watch
    checker = HealthChecker(
        health_checks(
            settings,
            redis=app[REDIS_AUX],
            watch=watch,
            postgres=app[POSTGRES],
            http=app[HTTP_CLIENT],
        ),
        timeout=settings.health_check_timeout_ms / 1000,
        interval=settings.health_check_interval,
        static_details=static_details(settings),
    )
    app[CHECKER] = checker
    app[PROBES].checker = checker
    task = asyncio.create_task(checker.run(), name="checker")
    yield
    await cancel_and_wait([task])


async def _telemetry(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = Keys(settings.redis_key_prefix)
    consumer = TelemetryConsumer(
        app[REDIS_AUX],
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
    if settings.dependency_metrics:
        app[DEPENDENCIES] = DependencyCollector(
            app[REDIS_AUX],
            keys,
            max_age=settings.dependency_metrics_cache,
            timeout=settings.health_check_timeout_ms / 1000,
        )
    # Serve /metrics from the first request when Redis answers; if it does not, start
    # anyway (health and the dashboard matter most then) and keep trying in the background.
    try:
        async with asyncio.timeout(settings.health_check_timeout_ms / 1000):
            await consumer.load()
    except REDIS_ERRORS as e:
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


def create_app(
    settings: SidecarSettings, *, tracing: Tracing | None = None, logs: Logs | None = None
) -> web.Application:
    """The sidecar. ``tracing`` and ``logs``: the process's (see ``service.app.create_app``);
    no tracing: its Redis and HTTP clients are not traced."""
    app = web.Application()
    app[SETTINGS] = settings
    app[TRACING] = tracing if tracing is not None else Tracing(provider=None)
    if logs is not None:
        app[LOGS] = logs
    probes = Probes(settings=settings, service_id=SERVICE_ID)
    app[PROBES] = probes
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.cleanup_ctx.extend(
        [
            app[TRACING].export_ctx,
            redis_client(blocking_ms=_blocking_read_ms(settings)),
            _postgres,
            http_client,
            _health,
        ]
    )
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
    # The aggregated health; its own liveness, as each process has.
    router.add_get("/health", probes.health, expect_handler=expect_continue)
    router.add_get("/health/liveness", probes.liveness, expect_handler=expect_continue)
    router.add_static(
        "/static", _HERE / "static", append_version=False, expect_handler=expect_continue
    )
    return app
