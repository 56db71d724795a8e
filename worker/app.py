"""``pulsecal-worker``: readings to Postgres, alert rules, analysis jobs; probes on WORKER_PORT.

The process is an aiohttp app like the service: its resources live in cleanup contexts, its
work in background tasks they own. The app only answers the Kubernetes probes
(``/health/liveness``, ``/health/readiness``, ``/health/startup``, ``/health``). Its
telemetry (``telemetry:{POD_NAME}``) and heartbeat (``heartbeat:{POD_NAME}``) are read by
the sidecar of the worker's pod, as the service's are by its own.
"""

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import psycopg
from aiohttp import web
from loguru import logger
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from shared.access import health_reply
from shared.alerts import count_open_alerts
from shared.appkeys import CHECKER, HTTP_CLIENT, LOGS, PG_POOL, REDIS_AUX, SETTINGS, TRACING
from shared.cli import LOGGING_ENV, TRACING_ENV, parse_program_args
from shared.health import (
    CheckResult,
    HealthChecker,
    now_result,
    startup_results,
)
from shared.httpserver import HttpServer, Limits, expect_continue, server_header
from shared.keys import Keys
from shared.logs import Logs, install_loop_handler, setup_logging
from shared.reporting import LoopLagMonitor, Telemetry, process_memory, publish_heartbeats
from shared.resources import health_checks, http_client, pool_stats, static_details
from shared.settings import Settings, load_settings_or_exit
from shared.tasks import cancel_and_wait
from shared.telemetry import Heartbeat, alert_record, encode_heartbeat
from shared.tracing import Tracing, setup_tracing
from shared.version import build_version

from .alerts import (
    LATE_METHOD,
    LATE_ROUTE,
    AlertChange,
    AlertEvaluator,
    SilenceWatcher,
    rules_from,
)
from .analysis_jobs import AnalysisRunner, CircuitBreaker, WindowScheduler
from .appkeys import WORKER
from .consumers import consumer_name
from .persist import STAGING_DDL, ReadingsPersister, StreamJanitor, ensure_partitions
from .state import WorkerState

__all__ = ("create_app", "main", "serve")

PROGRAM = "pulsecal-worker"
DESCRIPTION = """
The PulseCal worker: persists the readings from the Redis stream to Postgres, evaluates the
alert rules (heart rate, SpO2, silence) on them, and sends each device's windows of
ANALYSIS_WINDOW seconds to the AI service as analysis jobs. Its HTTP port answers only the
Kubernetes probes. Workers share the stream as one consumer group, so any number can run.
It stops on SIGTERM or SIGINT once the round in hand is committed.
"""
ENV_VARS = {
    "WORKER_PORT": "HTTP port of the probes, on all interfaces",
    "REDIS_URL": "readings stream, analysis queue, telemetry, heartbeat",
    "REDIS_KEY_PREFIX": "prefix of every Redis key; the same as the service's",
    "DATABASE_URL": "Postgres: readings, alerts, analyses",
    "AI_SERVICE_URL": "analysis service (POST /analyze); no analysis jobs when unset",
    "POD_NAME": "names this pod's telemetry and heartbeat; the host name when empty",
    "SHUTDOWN_TIMEOUT": "seconds the persist round in hand gets to finish on SIGTERM",
    "HEALTH_DETAIL_TOKEN": "operator token: health details (else METRICS_TOKEN)",
    "METRICS_TOKEN": "the operator token when HEALTH_DETAIL_TOKEN is unset",
    "ENVIRONMENT": "development shows health details when no operator token is set",
    **LOGGING_ENV,
    **TRACING_ENV,
}
_SERVICE_ID = "pulsecal-worker"
_PARTITION_INTERVAL = 3600.0
_STATS_INTERVAL = 5.0


async def _redis_client(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    timeout = settings.health_check_timeout_ms / 1000
    app[REDIS_AUX] = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=timeout,
        # Blocking reads wait up to WORKER_BLOCK_MS on the socket.
        socket_timeout=timeout + settings.worker_block_ms / 1000,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )
    app[TRACING].instrument_redis(app[REDIS_AUX])
    yield
    await app[REDIS_AUX].aclose()


async def _configure(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    await conn.execute(STAGING_DDL)
    await conn.commit()


async def _postgres_pool(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    tracing = app[TRACING]

    async def configure(conn: psycopg.AsyncConnection[TupleRow]) -> None:
        await _configure(conn)
        await tracing.instrument_postgres(conn)

    pool: AsyncConnectionPool = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        # The persister, the silence check and upkeep, and one per analysis job.
        max_size=3 + settings.analysis_concurrency,
        open=False,
        timeout=settings.health_check_timeout_ms / 1000,
        configure=configure,
        check=AsyncConnectionPool.check_connection,
        kwargs={"connect_timeout": max(1, settings.health_check_timeout_ms // 1000)},
    )
    await pool.open(wait=False)
    app[PG_POOL] = pool
    yield
    await pool.close()


async def _maintain_partitions(state: WorkerState, pool: AsyncConnectionPool, ahead: int) -> None:
    complained = False
    while True:
        try:
            created = await ensure_partitions(pool, days_ahead=ahead)
        except (psycopg.Error, OSError) as e:
            if isinstance(e, psycopg.ProgrammingError) and not complained:
                logger.error("worker: the schema is missing; run `pulsecal-admin db upgrade`")
                complained = True
            await asyncio.sleep(5.0)
            continue
        if created:
            logger.info("worker: created {} daily partitions of readings", created)
        state.schema_ready = True
        await asyncio.sleep(_PARTITION_INTERVAL)


async def _measure(state: WorkerState, redis: Redis, pool: AsyncConnectionPool, keys: Keys) -> None:
    while True:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_STATS_INTERVAL):
                state.dead_letters = int(await redis.xlen(keys.readings_dead))
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            async with asyncio.timeout(_STATS_INTERVAL):
                state.alerts_open = await count_open_alerts(pool)
        await asyncio.sleep(_STATS_INTERVAL)


class _LateReadingsLog:
    """Late readings logged as one warning a minute at most, with the count since the last."""

    EVERY = 60.0

    def __init__(self) -> None:
        self._count = 0
        self._next = 0.0

    def add(self, count: int) -> None:
        self._count += count
        now = time.monotonic()
        if now < self._next:
            return
        logger.warning(
            "worker: {} readings arrived older than their device's lateness bound"
            " (ALERT_LATENESS): stored, not evaluated by the vital alert rules",
            self._count,
        )
        self._count = 0
        self._next = now + self.EVERY


async def _worker(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = Keys(settings.redis_key_prefix)
    pod = settings.pod
    redis = app[REDIS_AUX]
    pool = app[PG_POOL]
    telemetry = Telemetry(
        redis,
        keys,
        pod,
        buffer_max=settings.telemetry_buffer_max,
        stream_maxlen=settings.telemetry_stream_maxlen,
        flush_interval=settings.telemetry_flush_interval,
        stream_ttl=settings.sidecar_state_ttl,
    )
    consumer = consumer_name(pod, telemetry.boot_id)

    def on_alert(change: AlertChange) -> None:
        change.log()
        telemetry.record(alert_record(change.rule, change.action))

    late_log = _LateReadingsLog()

    def on_late(count: int) -> None:
        for _ in range(count):
            telemetry.record(alert_record(LATE_ROUTE, LATE_METHOD))
        late_log.add(count)

    scheduler: WindowScheduler | None = None
    runner: AnalysisRunner | None = None
    if settings.ai_service_url is not None:
        scheduler = WindowScheduler(
            redis, keys, window=settings.analysis_window, grace=settings.analysis_grace
        )
        runner = AnalysisRunner(
            redis,
            pool,
            app[HTTP_CLIENT],
            keys,
            url=settings.ai_service_url,
            consumer=consumer,
            concurrency=settings.analysis_concurrency,
            timeout=settings.analysis_timeout,
            retries=settings.analysis_retries,
            backoff=settings.analysis_backoff,
            backoff_max=settings.analysis_backoff_max,
            breaker=CircuitBreaker(
                failures=settings.analysis_breaker_failures,
                reset=settings.analysis_breaker_reset,
            ),
            max_age=settings.analysis_max_age,
            claim_idle=settings.worker_claim_idle,
            dead_letter_after=settings.worker_dead_letter_after,
            telemetry=telemetry,
        )
    else:
        logger.info("worker: AI_SERVICE_URL is not set; no analysis jobs")
    persister = ReadingsPersister(
        redis,
        pool,
        keys,
        consumer=consumer,
        batch=settings.worker_batch,
        block_ms=settings.worker_block_ms,
        claim_idle=settings.worker_claim_idle,
        dead_letter_after=settings.worker_dead_letter_after,
        dead_letter_maxlen=settings.dead_letter_maxlen,
        retry_max=settings.worker_retry_max,
        alerts=AlertEvaluator(
            rules_from(settings),
            max_gap=settings.alert_max_gap,
            lateness=settings.alert_lateness,
        ),
        telemetry=telemetry,
        on_alert=on_alert,
        on_late=on_late,
        on_persisted=None if scheduler is None else scheduler.on_persisted,
        tracing=app[TRACING],
    )
    state = WorkerState(
        persister=persister,
        telemetry=telemetry,
        loop_lag=LoopLagMonitor(),
        scheduler=scheduler,
        runner=runner,
    )
    app[WORKER] = state
    checker = HealthChecker(
        health_checks(app),
        timeout=settings.health_check_timeout_ms / 1000,
        interval=settings.health_check_interval,
        static_details=static_details(settings),
    )
    app[CHECKER] = checker

    def on_measure(measured: dict[str, dict[str, int]]) -> None:
        readings = measured.get(keys.readings, {})
        persister.undelivered = readings.get("persist.lag", 0)
        persister.backlog = persister.undelivered + readings.get("persist.pending", 0)
        jobs = measured.get(keys.analysis_jobs, {})
        state.queue_depth = jobs.get("analysis.lag", 0)

    streams = [keys.readings] + ([keys.analysis_jobs] if runner is not None else [])
    janitor = StreamJanitor(
        redis, streams, interval=settings.worker_trim_interval, on_measure=on_measure
    )
    version = build_version()

    tracing = app[TRACING]
    logs = app.get(LOGS)

    def heartbeat() -> Heartbeat:
        rss, heap = process_memory()
        return Heartbeat(
            pod=pod,
            program=PROGRAM,
            boot_id=telemetry.boot_id,
            pid=os.getpid(),
            version=version,
            started_ms=state.started_ms,
            sent_ms=time.time_ns() // 1_000_000,
            ready=not state.draining and persister.group_ready and persister.db_ok,
            draining=state.draining,
            rss_bytes=rss,
            heap_bytes=heap,
            loop_lag_ms=round(state.loop_lag.take() * 1000, 3),
            redis_ok=checker.results["redis"].up,
            telemetry_dropped=telemetry.dropped,
            db_pool=pool_stats(pool),
            queue_depth=state.queue_depth,
            queue_jobs_active=0 if runner is None else runner.active,
            readings_lag=persister.backlog,
            dead_letters=state.dead_letters,
            rows_persisted=persister.rows,
            samples_persisted=persister.samples,
            alerts_open=state.alerts_open,
            ai_circuit="closed" if runner is None else runner.breaker.state,
            spans_dropped=tracing.dropped,
            log_lines_dropped=logs.logstash_dropped if logs is not None else 0,
        )

    background: dict[str, Coroutine[Any, Any, None]] = {
        "telemetry": telemetry.run(),
        "loop-lag": state.loop_lag.run(),
        "checker": checker.run(),
        "partitions": _maintain_partitions(state, pool, settings.readings_partitions_ahead),
        "janitor": janitor.run(),
        "measure": _measure(state, redis, pool, keys),
        "heartbeat": publish_heartbeats(
            redis,
            keys.heartbeat(pod),
            heartbeat,
            encode_heartbeat,
            interval=settings.heartbeat_interval,
            ttl=settings.heartbeat_ttl,
        ),
    }
    if runner is not None:
        background["analysis"] = runner.run()
    if settings.alert_silence_after > 0:
        silence = SilenceWatcher(
            pool,
            after=settings.alert_silence_after,
            # Measured by the janitor (-1 until then) and within one round of the head.
            caught_up=lambda: (
                persister.db_ok and 0 <= persister.undelivered <= settings.worker_batch
            ),
            on_change=on_alert,
        )
        background["silence"] = silence.run()
    tasks = [asyncio.create_task(coro, name=name) for name, coro in background.items()]
    persist_task = asyncio.create_task(persister.run(), name="persist")
    logger.info("worker: consumer {} of group persist", consumer)
    yield
    # Finish the round in hand (its entries are committed and acknowledged), then stop.
    persister.stop()
    try:
        async with asyncio.timeout(settings.shutdown_timeout):
            await asyncio.shield(persist_task)
    except TimeoutError:
        logger.warning("shutdown: the persist round did not finish; its entries stay pending")
    await cancel_and_wait([persist_task, *tasks])
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await telemetry.flush()
            await redis.set(
                keys.heartbeat(pod), encode_heartbeat(heartbeat()), ex=settings.heartbeat_ttl
            )


def _respond(request: web.Request, results: dict[str, CheckResult]) -> web.Response:
    return health_reply(request, results, settings=request.app[SETTINGS], service_id=_SERVICE_ID)


async def liveness(request: web.Request) -> web.Response:
    state = request.app[WORKER]
    uptime = (time.time_ns() // 1_000_000 - state.started_ms) / 1000
    return _respond(request, {"process": now_result(True, pid=os.getpid(), uptime_s=uptime)})


def _readiness_results(request: web.Request) -> dict[str, CheckResult]:
    state = request.app[WORKER]
    results = request.app[CHECKER].results
    persister = state.persister
    return {
        "redis": results["redis"],
        "database": results["database"]
        if persister.db_ok
        else now_result(False, "the last write to Postgres failed"),
        "consumer_group": now_result(
            persister.group_ready, None if persister.group_ready else "not created yet"
        ),
        "schema": now_result(state.schema_ready, None if state.schema_ready else "not checked yet"),
        "worker": now_result(not state.draining, "shutting down" if state.draining else None),
    }


async def readiness(request: web.Request) -> web.Response:
    return _respond(request, _readiness_results(request))


async def startup(request: web.Request) -> web.Response:
    state = request.app[WORKER]
    results = _readiness_results(request)
    del results["worker"]
    state.started, results = startup_results(results, started=state.started)
    return _respond(request, results)


async def health(request: web.Request) -> web.Response:
    return _respond(request, dict(request.app[CHECKER].results))


def create_app(
    settings: Settings, *, tracing: Tracing | None = None, logs: Logs | None = None
) -> web.Application:
    """The worker. ``tracing`` and ``logs``: the process's (see ``service.app.create_app``)."""
    app = web.Application()
    app.on_response_prepare.append(server_header)
    app[SETTINGS] = settings
    app[TRACING] = tracing if tracing is not None else Tracing(provider=None)
    if logs is not None:
        app[LOGS] = logs
    app.cleanup_ctx.extend(
        [app[TRACING].export_ctx, _redis_client, _postgres_pool, http_client, _worker]
    )
    for path, probe in (
        ("/health/liveness", liveness),
        ("/health/readiness", readiness),
        ("/health/startup", startup),
        ("/health", health),
    ):
        app.router.add_get(path, probe, expect_handler=expect_continue)
    return app


async def serve(
    settings: Settings,
    *,
    host: str = "0.0.0.0",
    tracing: Tracing | None = None,
    logs: Logs | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; then finish the round in hand and stop."""
    install_loop_handler(asyncio.get_running_loop())
    app = create_app(settings, tracing=tracing, logs=logs)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    http = HttpServer(runner, limits=Limits.from_settings(settings))
    await http.start(host, settings.worker_port, reuse_address=True)
    logger.info("{} probes on {}:{} as pod {}", PROGRAM, host, settings.worker_port, settings.pod)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("shutting down")
    app[WORKER].draining = True
    app[WORKER].persister.stop()
    await http.close()
    await runner.cleanup()
    logger.info("shutdown complete")


def main(argv: Sequence[str] | None = None) -> None:
    parse_program_args(PROGRAM, DESCRIPTION, ENV_VARS, argv)
    settings = load_settings_or_exit(os.environ, PROGRAM)
    with setup_logging(settings, program=PROGRAM) as logs:
        tracing = setup_tracing(settings, service_name=PROGRAM)
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(settings, tracing=tracing, logs=logs))
        else:
            uvloop.run(serve(settings, tracing=tracing, logs=logs))
        finally:
            tracing.shutdown()
