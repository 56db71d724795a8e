"""The ingestion service's application factory."""

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from loguru import logger

from shared.appkeys import (
    HTTP_SERVER,
    LOGS,
    PG_POOL,
    PROBES,
    REDIS_AUX,
    TRACING,
)
from shared.httpserver import SERVER, expect_continue
from shared.keys import Keys
from shared.logs import Logs
from shared.reporting import LoopLagMonitor, Telemetry, process_memory
from shared.resources import dependency_checker, pool_stats
from shared.runtime.clients import http_client, postgres_pool, redis_client
from shared.runtime.heartbeat import HeartbeatPublisher
from shared.runtime.probes import Probes
from shared.settings import ServiceSettings
from shared.tasks import cancel_and_wait
from shared.telemetry import ServiceHeartbeat
from shared.tracing import Tracing
from shared.version import build_version

from . import alerts_api, openapi, probes
from .appkeys import INGEST, REDIS_DATA, SETTINGS
from .edge import UNMATCHED, instrumented, not_found
from .fastpath.cluster import Address, SlotMap
from .fastpath.keepalive import close_going_away, keep_alive
from .fastpath.resp import RespConnection, cluster_slots
from .ingest import HTTP_ROUTE, WS_ROUTE, ingest_http, ingest_ws
from .partitions import PartitionedBacklog, PartitionedWriter, partition_slot
from .probes import REPLICATION_CHECK
from .ratelimit import Policy, RateLimiter, TrustedProxies, Window
from .replication import REPLICATED, Replication, replication_check
from .state import IngestState
from .store import WRITE_CONNECTION_SETUP, ReadingsWriter
from .tokens import TokenCache, TokenRefresher

__all__ = ("create_app", "drain")


async def _data_connections(app: web.Application) -> AsyncIterator[None]:
    """A write connection per partition; on a cluster, each to its partition's primary."""
    settings = app[SETTINGS]
    url = settings.redis_url
    slots = None
    if settings.redis_cluster:
        seed = urlsplit(url)
        timeout = settings.write_timeout

        async def query(address: Address) -> list[Any]:
            return await cluster_slots(url, address, connect_timeout=timeout)

        slots = SlotMap([(seed.hostname or "127.0.0.1", seed.port or 6379)], query=query)
    partitions = Keys(settings.redis_key_prefix).partitions(settings.ingest_partitions)
    connections = tuple(
        RespConnection(
            url,
            connect_timeout=settings.write_timeout,
            setup=WRITE_CONNECTION_SETUP,
            slots=slots,
            slot=partition_slot(p),
        )
        for p in partitions
    )
    app[REDIS_DATA] = connections
    yield
    for connection in connections:
        connection.close()


# The token refresher and the alerts API.
_postgres_pool = postgres_pool(max_size=2)


def _policies(settings: ServiceSettings) -> tuple[Policy | None, Policy | None]:
    """(api, ingest): 100/min per client IP for API routes, 1000/min per device for ingest,
    each with an optional short burst window; health routes have none."""
    if not settings.rate_limit_enabled:
        return None, None
    api = [Window("default", settings.rate_limit_max, settings.rate_limit_ttl)]
    if settings.rate_limit_burst_max:
        api.append(Window("burst", settings.rate_limit_burst_max, settings.rate_limit_burst_ttl))
    ingest = [Window("default", settings.rate_limit_ingest_max, settings.rate_limit_ingest_ttl)]
    if settings.rate_limit_ingest_burst_max:
        ingest.append(
            Window(
                "burst", settings.rate_limit_ingest_burst_max, settings.rate_limit_ingest_burst_ttl
            )
        )
    shadow = settings.rate_limit_shadow
    return (
        Policy("api", tuple(api), key="ip", shadow="api" in shadow),
        Policy("ingest", tuple(ingest), key="device", shadow="ingest" in shadow),
    )


async def _ingest(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = Keys(settings.redis_key_prefix)
    pod = settings.pod
    tokens = TokenCache()
    api_policy, ingest_policy = _policies(settings)
    replicated = settings.ack_mode == REPLICATED
    replication = Replication(settings.ack_mode, settings.ack_replicas if replicated else 0)
    partitions = keys.partitions(settings.ingest_partitions)
    connections: tuple[RespConnection, ...] = app[REDIS_DATA]
    writer = PartitionedWriter(
        [
            ReadingsWriter(
                connection,
                partition,
                max_batch=settings.write_max_batch,
                max_pending=settings.write_max_pending,
                max_in_flight=settings.write_max_in_flight,
                timeout=settings.write_timeout,
                idempotency_window=settings.idempotency_window,
                idempotency_ttl=settings.idempotency_ttl,
                policy=ingest_policy,
                ack_replicas=replication.required,
                ack_timeout=settings.ack_timeout,
            )
            for connection, partition in zip(connections, partitions, strict=True)
        ]
    )
    state = IngestState(
        tokens=tokens,
        writer=writer,
        backlog=PartitionedBacklog(
            app[REDIS_AUX],
            keys,
            partitions,
            limit=settings.readings_max_backlog,
            interval=settings.backlog_check_interval,
            batches_per_entry=lambda: writer.batches_per_entry,
        ),
        telemetry=Telemetry(
            app[REDIS_AUX],
            keys,
            pod,
            buffer_max=settings.telemetry_buffer_max,
            stream_maxlen=settings.telemetry_stream_maxlen,
            flush_interval=settings.telemetry_flush_interval,
            stream_ttl=settings.sidecar_state_ttl,
        ),
        loop_lag=LoopLagMonitor(),
        max_body_bytes=settings.max_body_bytes,
        retry_after=settings.retry_after,
        ws_heartbeat=settings.ws_heartbeat,
        limiter=RateLimiter(
            app[REDIS_AUX],
            keys,
            fail_closed=settings.rate_limit_fail_mode == "closed",
            timeout=settings.write_timeout,
        ),
        proxies=TrustedProxies(settings.trusted_proxies, header=settings.trusted_proxy_header),
        api_policy=api_policy,
        ingest_policy=ingest_policy,
        ws_close_after=settings.rate_limit_ws_close_after,
        tracing=app[TRACING],
    )
    app[INGEST] = state
    checker = dependency_checker(
        app,
        {
            REPLICATION_CHECK: replication_check(
                app[REDIS_AUX], state.writer, replication, partitions
            )
        },
    )
    process = app[PROBES]
    process.ready = probes.readiness_checks(state, checker)
    process.draining = lambda: state.draining
    process.checker = checker
    http = app.get(HTTP_SERVER)
    if http is not None:
        state.count_connections = lambda: len(http.connections)
    refresher = TokenRefresher(tokens, app[PG_POOL], interval=settings.token_refresh_interval)
    version = build_version()
    pool = app[PG_POOL]

    logs = app.get(LOGS)

    def heartbeat() -> ServiceHeartbeat:
        rss, heap = process_memory()
        writer = state.writer
        return ServiceHeartbeat(
            pod=pod,
            boot_id=state.telemetry.boot_id,
            pid=os.getpid(),
            version=version,
            started_ms=process.started_ms,
            sent_ms=time.time_ns() // 1_000_000,
            ready=not state.draining and tokens.loaded and writer.healthy,
            draining=state.draining,
            rss_bytes=rss,
            heap_bytes=heap,
            loop_lag_ms=round(state.loop_lag.take() * 1000, 3),
            http_connections=state.count_connections(),
            ws_connections=len(state.websockets),
            pending_writes=writer.pending,
            writes_ok=writer.stored,
            writes_duplicate=writer.duplicates,
            writes_failed=writer.failed,
            write_batches=writer.batches,
            writes_unreplicated=writer.unreplicated,
            ack_mode=replication.mode,
            ack_replicas=replication.required,
            redis_role=replication.role,
            redis_replicas_online=replication.replicas_online,
            redis_replication_lag_seconds=replication.lag_seconds,
            redis_ok=checker.results["redis"].up,
            backlog=state.backlog.backlog,
            backlog_exceeded=state.backlog.exceeded,
            telemetry_dropped=state.telemetry.dropped,
            spans_dropped=state.tracing.dropped,
            log_lines_dropped=logs.logstash_dropped if logs is not None else 0,
            rate_limit_fallbacks=state.limiter.fallback_decisions,
            tokens_loaded=len(tokens),
            db_pool=pool_stats(pool),
        )

    heartbeats = HeartbeatPublisher(
        app[REDIS_AUX],
        keys.heartbeat(pod),
        heartbeat,
        interval=settings.heartbeat_interval,
        ttl=settings.heartbeat_ttl,
        seen=(keys.pods_seen, pod),
    )

    # Serve only once the tokens are known; if Postgres is down, start anyway and keep
    # trying (the startup probe says "not yet" meanwhile).
    try:
        async with asyncio.timeout(settings.health_check_timeout_ms / 1000):
            await refresher.refresh(full=True)
    except Exception as e:  # noqa: BLE001 - any failure here is retried by the refresher
        logger.warning("device tokens not loaded at startup, retrying in background: {}", e)

    background: dict[str, Coroutine[Any, Any, None]] = {
        "writer": state.writer.run(),
        "backlog": state.backlog.run(),
        "telemetry": state.telemetry.run(),
        "loop-lag": state.loop_lag.run(),
        "ws-keepalive": keep_alive(state.websockets, interval=settings.ws_heartbeat),
        "tokens": refresher.run(),
        "checker": checker.run(),
        "heartbeat": heartbeats.run(),
    }
    tasks = [asyncio.create_task(coro, name=name) for name, coro in background.items()]
    yield
    # Handlers have finished (aiohttp waited for them); what they submitted is written now.
    try:
        async with asyncio.timeout(settings.write_timeout + 1):
            await state.writer.drain()
    except TimeoutError:
        logger.error("shutdown: {} batches still unwritten", state.writer.pending)
    await cancel_and_wait(tasks)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await state.telemetry.flush()
            await heartbeats.publish()


async def drain(app: web.Application) -> None:
    """Stop taking batches, answer those already taken, close device sockets cleanly, and
    (when the runtime serves the app, no longer accepting) answer every request received,
    each connection closing after its last answer. All within ``SHUTDOWN_TIMEOUT``. Once:
    a later call (aiohttp's ``on_shutdown``, after the runtime's) finds it done.

    Runs while connections are still open, so a body still arriving and a device's answer
    to the close frame are read. Devices get ``WS_HANDSHAKE_TIMEOUT`` to answer the close.
    """
    state = app[INGEST]
    if state.draining:
        return
    state.draining = True
    settings = app[SETTINGS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.shutdown_timeout
    http = app.get(HTTP_SERVER)
    answered = None
    if http is not None:
        http.close_after_answers()
        answered = asyncio.create_task(http.wait_answered(deadline), name="drain-http")
    # Polled, not awaited on an Event: the counter is bumped on the hot path, an Event
    # would cost every request for the sake of shutdown.
    while state.batches_in_flight and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    if state.batches_in_flight:
        logger.warning("shutdown: {} batches still unanswered", state.batches_in_flight)
    handshake = min(settings.ws_handshake_timeout, max(0.0, deadline - loop.time()))
    await _close_websockets(state, handshake=handshake)
    if answered is not None:
        left = await answered
        if left:
            logger.warning("shutdown: {} HTTP connections still busy", left)


async def _close_websockets(state: IngestState, *, handshake: float) -> None:
    """1001 to every device socket, then up to ``handshake`` seconds for the devices' close
    frames: each socket's handler reads its device's and ends, removing the socket."""
    sockets = [ws for ws in state.websockets if not ws.closed]
    if not sockets:
        return
    loop = asyncio.get_running_loop()
    until = loop.time() + handshake
    sending = [asyncio.create_task(close_going_away(ws, b"server shutting down")) for ws in sockets]
    _, stuck = await asyncio.wait(sending, timeout=handshake)
    await cancel_and_wait(stuck)  # a device that reads nothing: its close frame never left
    while state.websockets and loop.time() < until:  # noqa: ASYNC110 - shutdown only
        await asyncio.sleep(0.01)
    if state.websockets:
        logger.warning("shutdown: {} WebSockets did not answer the close", len(state.websockets))
        for peer in list(state.websockets.values()):
            if peer.transport is not None:
                peer.transport.close()


async def _answer_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer but the ingest route's 202 (written by ``AckResponse``) and the
    parser's refusals (``shared/httpserver.py``): no versions in ``Server``, and while
    draining, ``Connection: close``."""
    # Runs after aiohttp chose the headers, before it writes them: Connection is set here.
    response.headers["Server"] = SERVER
    if request.app[INGEST].draining:
        response.force_close()
        response.headers["Connection"] = "close"


def create_app(
    settings: ServiceSettings, *, tracing: Tracing | None = None, logs: Logs | None = None
) -> web.Application:
    """The service. ``tracing`` and ``logs`` are the process's (``setup_tracing``,
    ``setup_logging``): without them it is not traced and reports no Logstash drops."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    if logs is not None:
        app[LOGS] = logs
    app[TRACING] = tracing if tracing is not None else Tracing(provider=None)
    app[PROBES] = Probes(
        settings=settings, service_id=probes.SERVICE_ID, serving=probes.SERVING_CHECK
    )
    # The span export first, so it stops last: the spans of the shutdown leave too.
    app.cleanup_ctx.extend(
        [
            app[TRACING].export_ctx,
            redis_client(),
            _data_connections,
            _postgres_pool,
            http_client,
            _ingest,
        ]
    )
    # Served by the runtime, the drain has run before (shared/runtime/serving.py); run by
    # anything else (tests), aiohttp's shutdown is the only signal there is.
    app.on_shutdown.append(drain)
    app.on_response_prepare.append(_answer_headers)
    router = app.router
    # Rate-limit policies are declared with the routes: ingestion is limited per device
    # inside its write (service/store.py), other routes per client IP, health never.
    api_policy, _ = _policies(settings)
    # Every route meets Expect: 100-continue and refuses any other expectation as JSON
    # (expect_continue).
    # The ingest routes record their own telemetry (samples stored, WebSocket events).
    router.add_post(HTTP_ROUTE, ingest_http, expect_handler=expect_continue)
    router.add_get(WS_ROUTE, ingest_ws, expect_handler=expect_continue)
    for path, probe in app[PROBES].routes():
        # Never limited, never traced: probes would fill the traces with noise.
        router.add_get(
            path, instrumented(path, probe, traced=False), expect_handler=expect_continue
        )
    router.add_get(
        alerts_api.ALERTS_ROUTE,
        instrumented(alerts_api.ALERTS_ROUTE, alerts_api.get_alerts, policy=api_policy),
        expect_handler=expect_continue,
    )
    router.add_get(
        openapi.OPENAPI_ROUTE,
        instrumented(openapi.OPENAPI_ROUTE, openapi.openapi_handler(), policy=api_policy),
        expect_handler=expect_continue,
    )
    router.add_route(
        "*",
        "/{path:.*}",
        instrumented(UNMATCHED, not_found, policy=api_policy),
        expect_handler=expect_continue,
    )
    return app
