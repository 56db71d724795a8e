"""``/metrics``: the families of ``sidecar/metrics.py`` as of the scrape, for Prometheus."""

import asyncio
import hmac
import time

from aiohttp import web

from shared.appkeys import CHECKER
from shared.redisclient import REDIS_ERRORS
from shared.telemetry import WorkerHeartbeat

from .aggregate import Aggregator
from .appkeys import CONSUMER, DEPENDENCIES, HEARTBEAT, METRICS, SETTINGS
from .dependencies import postgres_families, redis_families
from .exposition import OPENMETRICS, TEXT, Family, render, wants_openmetrics
from .health import HeartbeatWatch
from .metrics import health_families

__all__ = ("metrics_handler",)

_HEARTBEAT_REFRESH_TIMEOUT = 0.5


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Bytes that are not UTF-8 reach us as lone surrogates (aiohttp's headers, Python's
    # environment), which a plain encode() refuses: "surrogatepass" encodes any str.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass")
    )


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    if settings.metrics_token is not None and not _authorized(request, settings.metrics_token):
        return web.Response(
            status=401,
            text="a bearer token is required\n",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    consumer = app[CONSUMER]
    if consumer.aggregator is None:
        return web.Response(
            status=503,
            text=f"telemetry state not loaded yet: {consumer.error or 'starting'}\n",
            headers={"Retry-After": "1"},
        )
    watch: HeartbeatWatch = app[HEARTBEAT]
    await _refresh_heartbeat(watch)
    now = time.time()
    heartbeat = watch.fresh(now)
    latest = watch.latest
    openmetrics = wants_openmetrics(request.headers.get("Accept", ""))
    view = app[METRICS]

    checks = app[CHECKER].results
    # Beside a worker: Redis's and the readings streams' figures (cached a few seconds), and
    # the database's from the worker's heartbeat.
    dependencies: list[Family] = []
    collector = app.get(DEPENDENCIES)
    if collector is not None and collector.follow(latest):
        dependencies.extend(redis_families(await collector.collect()))
        dependencies.extend(
            postgres_families(
                heartbeat.postgres if isinstance(heartbeat, WorkerHeartbeat) else None
            )
        )

    def build(aggregator: Aggregator) -> bytes:
        families = view.families(
            aggregator,
            consumer,
            heartbeat,
            heartbeat_age_s=None if latest is None else watch.age_s(latest, now),
            max_series=settings.metrics_max_series,
        )
        families.extend(health_families(checks))
        families.extend(dependencies)
        return render(families, openmetrics=openmetrics)

    body = await consumer.save_after(build)
    return web.Response(body=body, headers={"Content-Type": OPENMETRICS if openmetrics else TEXT})


async def _refresh_heartbeat(watch: HeartbeatWatch) -> None:
    # The gauges should be as of the scrape; if Redis is slow the cached heartbeat serves.
    try:
        async with asyncio.timeout(_HEARTBEAT_REFRESH_TIMEOUT):
            await watch.refresh()
    except REDIS_ERRORS:
        pass  # the last heartbeat read stays in use while it is fresh
