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
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import psycopg
from aiohttp import web
from loguru import logger
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from shared.alerts import count_open_alerts
from shared.appkeys import (
    HTTP_CLIENT,
    LOGS,
    PG_POOL,
    PROBES,
    REDIS_AUX,
    TRACING,
)
from shared.cli import parse_program_args
from shared.health import CheckResult, HealthChecker, now_result
from shared.httpserver import expect_continue, server_header
from shared.keys import Keys, PartitionKeys
from shared.logs import Logs, setup_logging
from shared.readings import PERSIST_GROUP
from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.reporting import LoopLagMonitor, Telemetry, process_memory
from shared.resources import dependency_checker, pool_stats
from shared.runtime.clients import http_client, postgres_pool, redis_client
from shared.runtime.heartbeat import HeartbeatPublisher
from shared.runtime.probes import Probes
from shared.runtime.serving import Program, run
from shared.settings import WorkerSettings, load_settings_or_exit
from shared.tasks import cancel_and_wait
from shared.telemetry import WORKER_PROGRAM, WorkerHeartbeat, alert_record
from shared.tracing import Tracing
from shared.version import build_version

from .alerts import (
    LATE_METHOD,
    LATE_ROUTE,
    AlertChange,
    AlertEvaluator,
    SilenceWatcher,
    rules_from,
)
from .analysis_jobs import ANALYSIS_GROUP, AnalysisRunner, CircuitBreaker, WindowScheduler
from .appkeys import SETTINGS, WORKER
from .cleaner import KeysCleaner
from .consumers import consumer_name
from .dbstats import INTERVAL as POSTGRES_INTERVAL
from .dbstats import measure_postgres
from .partitions import PartitionedPersistence
from .persist import STAGING_DDL, ReadingsPersister, StreamJanitor, ensure_partitions
from .state import WorkerState

__all__ = ("WORKER_RUNTIME", "create_app", "main")

PROGRAM = WORKER_PROGRAM
DESCRIPTION = """
The PulseCal worker: persists the readings from the Redis stream to Postgres, evaluates the
alert rules (heart rate, SpO2, silence) on them, and sends each device's windows of
ANALYSIS_WINDOW seconds to the AI service as analysis jobs. Its HTTP port answers only the
Kubernetes probes. Workers share the stream as one consumer group, so any number can run.
It stops on SIGTERM or SIGINT once the round in hand is committed.
"""
_PARTITION_INTERVAL = 3600.0
_STATS_INTERVAL = 5.0


def _blocking_read_ms(settings: WorkerSettings) -> int:
    # Blocking reads wait up to WORKER_BLOCK_MS on the socket.
    return settings.worker_block_ms


def _pool_size(settings: WorkerSettings) -> int:
    # The persister, the silence check and upkeep, and one per analysis job.
    return 3 + settings.analysis_concurrency


async def _staging_table(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    await conn.execute(STAGING_DDL)
    await conn.commit()


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


async def _measure(
    state: WorkerState, redis: RedisClient, pool: AsyncConnectionPool, keys: Keys
) -> None:
    next_postgres = 0.0
    while True:
        with contextlib.suppress(*REDIS_ERRORS):
            async with asyncio.timeout(_STATS_INTERVAL):
                dead = [await redis.xlen(p.readings_dead) for p in state.persister.streams()]
                state.dead_letters = sum(int(n) for n in dead)
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            async with asyncio.timeout(_STATS_INTERVAL):
                state.alerts_open = await count_open_alerts(pool)
        if time.monotonic() >= next_postgres:
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                async with asyncio.timeout(_STATS_INTERVAL):
                    state.postgres = await measure_postgres(pool)
                next_postgres = time.monotonic() + POSTGRES_INTERVAL
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

    def persister_of(partition: PartitionKeys) -> ReadingsPersister:
        return ReadingsPersister(
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
            alerts=alerts,
            telemetry=telemetry,
            on_alert=on_alert,
            on_late=on_late,
            on_persisted=None if scheduler is None else scheduler.on_persisted,
            tracing=app[TRACING],
            partition=partition,
        )

    # One evaluator for every partition: a device's alert state is in Postgres, loaded and
    # saved in the transaction that stores its readings, whichever partition they came from.
    alerts = AlertEvaluator(
        rules_from(settings),
        max_gap=settings.alert_max_gap,
        lateness=settings.alert_lateness,
    )
    persister = PartitionedPersistence(
        redis,
        keys,
        consumer=consumer,
        partitions=settings.ingest_partitions,
        layout_grace=settings.ingest_layout_grace,
        interval=PartitionedPersistence.INTERVAL,
        member_ttl=PartitionedPersistence.MEMBER_TTL,
        make=persister_of,
        stop_timeout=settings.shutdown_timeout,
    )
    state = WorkerState(
        persister=persister,
        telemetry=telemetry,
        loop_lag=LoopLagMonitor(),
        scheduler=scheduler,
        runner=runner,
    )
    app[WORKER] = state
    checker = dependency_checker(app)
    probes = app[PROBES]
    probes.ready = _readiness_checks(state, checker)
    probes.draining = lambda: state.draining
    probes.checker = checker

    def on_measure(measured: dict[str, dict[str, int]]) -> None:
        partitions = {}
        for partition in persister.streams():
            readings = measured.get(partition.readings, {})
            partitions[partition.partition.name] = (
                readings.get("persist.lag", 0),
                readings.get("persist.pending", 0),
            )
        persister.measured = partitions
        jobs = measured.get(keys.analysis_jobs, {})
        state.queue_depth = jobs.get("analysis.lag", 0)

    def streams() -> list[str]:
        readings = [p.readings for p in persister.streams()]
        return readings + ([keys.analysis_jobs] if runner is not None else [])

    janitor = StreamJanitor(
        redis, streams, interval=settings.worker_trim_interval, on_measure=on_measure
    )

    def groups() -> list[tuple[str, str]]:
        readings = [(p.readings, PERSIST_GROUP) for p in persister.streams()]
        return [*readings, (keys.analysis_jobs, ANALYSIS_GROUP)]

    cleaner = KeysCleaner(
        redis,
        keys,
        consumer=consumer,
        grace=settings.pod_keys_grace,
        groups=groups,
        own_layout=settings.ingest_partitions,
    )
    version = build_version()

    tracing = app[TRACING]
    logs = app.get(LOGS)

    def heartbeat() -> WorkerHeartbeat:
        rss, heap = process_memory()
        return WorkerHeartbeat(
            pod=pod,
            boot_id=telemetry.boot_id,
            pid=os.getpid(),
            version=version,
            started_ms=probes.started_ms,
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
            partition_backlog=persister.partition_backlog,
            postgres=state.postgres,
            dead_letters=state.dead_letters,
            rows_persisted=persister.rows,
            samples_persisted=persister.samples,
            alerts_open=state.alerts_open,
            ai_circuit="closed" if runner is None else runner.breaker.state,
            spans_dropped=tracing.dropped,
            log_lines_dropped=logs.logstash_dropped if logs is not None else 0,
            pods_removed=cleaner.pods_removed,
        )

    heartbeats = HeartbeatPublisher(
        redis,
        keys.heartbeat(pod),
        heartbeat,
        interval=settings.heartbeat_interval,
        ttl=settings.heartbeat_ttl,
        seen=(keys.pods_seen, pod),
    )

    background: dict[str, Coroutine[Any, Any, None]] = {
        "telemetry": telemetry.run(),
        "loop-lag": state.loop_lag.run(),
        "checker": checker.run(),
        "partitions": _maintain_partitions(state, pool, settings.readings_partitions_ahead),
        "janitor": janitor.run(),
        "cleaner": cleaner.run(),
        "measure": _measure(state, redis, pool, keys),
        "heartbeat": heartbeats.run(),
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
    # Finish the rounds in hand (their entries are committed and acknowledged), then stop.
    persister.stop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(settings.shutdown_timeout + 1.0):
            await asyncio.shield(persist_task)
    await cancel_and_wait([persist_task, *tasks])
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await telemetry.flush()
            await heartbeats.publish()


def _readiness_checks(
    state: WorkerState, checker: HealthChecker
) -> Callable[[], dict[str, CheckResult]]:
    def results() -> dict[str, CheckResult]:
        persister = state.persister
        return {
            "redis": checker.results["redis"],
            "database": checker.results["database"]
            if persister.db_ok
            else now_result(False, "the last write to Postgres failed"),
            "consumer_group": now_result(
                persister.group_ready, None if persister.group_ready else "not created yet"
            ),
            "schema": now_result(
                state.schema_ready, None if state.schema_ready else "not checked yet"
            ),
        }

    return results


async def _stop_taking_work(app: web.Application) -> None:
    """Unready at once; the persister finishes the round in hand and reads no more (its
    cleanup context waits for it)."""
    state = app[WORKER]
    state.draining = True
    state.persister.stop()


def create_app(
    settings: WorkerSettings, *, tracing: Tracing | None = None, logs: Logs | None = None
) -> web.Application:
    """The worker. ``tracing`` and ``logs``: the process's (see ``service.app.create_app``)."""
    app = web.Application()
    app.on_response_prepare.append(server_header)
    app[SETTINGS] = settings
    app[TRACING] = tracing if tracing is not None else Tracing(provider=None)
    if logs is not None:
        app[LOGS] = logs
    probes = Probes(settings=settings, service_id=PROGRAM, serving="worker")
    app[PROBES] = probes
    app.cleanup_ctx.extend(
        [
            app[TRACING].export_ctx,
            redis_client(blocking_ms=_blocking_read_ms(settings)),
            postgres_pool(max_size=_pool_size(settings), configure=_staging_table, check=True),
            http_client,
            _worker,
        ]
    )
    app.on_shutdown.append(_stop_taking_work)
    for path, probe in probes.routes():
        app.router.add_get(path, probe, expect_handler=expect_continue)
    return app


def _port(settings: WorkerSettings) -> int:
    return settings.worker_port


WORKER_RUNTIME = Program(name=PROGRAM, create_app=create_app, port=_port, traced_as=PROGRAM)


def main(argv: Sequence[str] | None = None) -> None:
    parse_program_args(PROGRAM, DESCRIPTION, WorkerSettings, argv)
    settings = load_settings_or_exit(os.environ, WorkerSettings)
    # Leaving the block flushes Logstash and logs an exception that ends the process.
    with setup_logging(settings, program=PROGRAM) as logs:
        run(WORKER_RUNTIME, settings, logs=logs)
