"""The runtime every program runs on: serving through the shared HTTP server, stopping in
order (the drain with the listener closed, then aiohttp's shutdown), the clients of the
cleanup contexts, the probes and the heartbeat loop."""

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from shared.appkeys import HTTP_CLIENT, HTTP_SERVER, PG_POOL, PROBES, REDIS_AUX, SETTINGS, TRACING
from shared.health import CheckResult, HealthChecker, now_result
from shared.httpserver import SERVER, server_header
from shared.keys import Keys
from shared.logs import Logs
from shared.runtime.clients import http_client, postgres_pool, redis_client
from shared.runtime.heartbeat import HeartbeatPublisher
from shared.runtime.probes import Probes
from shared.runtime.serving import Program, running, serve
from shared.settings import ServiceSettings
from shared.telemetry import WorkerHeartbeat, decode_heartbeat
from shared.tracing import Tracing
from tests.support.env import REDIS_URL, AiohttpClient
from tests.support.rawhttp import converse

OPERATOR = "operator-token-for-tests"
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR}"}
GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@dataclasses.dataclass
class Trail:
    """What a test program went through, in order, and the apps it made."""

    events: list[str] = dataclasses.field(default_factory=list)
    apps: list[web.Application] = dataclasses.field(default_factory=list)


def program_of(trail: Trail) -> Program:
    def create_app(
        settings: ServiceSettings, *, tracing: Tracing | None = None, logs: Logs | None = None
    ) -> web.Application:
        app = web.Application()
        app[SETTINGS] = settings

        async def resources(app: web.Application) -> AsyncIterator[None]:
            trail.events.append("started")
            yield
            trail.events.append("cleaned up")

        async def on_shutdown(app: web.Application) -> None:
            trail.events.append("on_shutdown")

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="hello")

        app.cleanup_ctx.append(resources)
        app.on_shutdown.append(on_shutdown)
        app.on_response_prepare.append(server_header)
        app.router.add_get("/", hello)
        trail.apps.append(app)
        return app

    async def drain(app: web.Application) -> None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", app[HTTP_SERVER].port)
        except OSError:
            trail.events.append("drain, not accepting")
        else:
            writer.close()
            trail.events.append("drain, still accepting")

    return Program(name="pulsecal-test", create_app=create_app, port=_port, drain=drain)


def _port(settings: ServiceSettings) -> int:
    return settings.port


async def test_a_program_serves_through_the_shared_http_server(settings: ServiceSettings) -> None:
    async with running(program_of(Trail()), settings, host="127.0.0.1") as served:
        answer = await converse(served.port, [GET])
        refused = await converse(served.port, [b"GET / HTTP/9.9\r\nHost: x\r\n\r\n"])

    assert (answer.status, answer.body, answer.headers["server"]) == (200, b"hello", SERVER)
    assert refused.status == 400
    assert refused.headers["content-type"].startswith("application/json")
    assert refused.json()["error"]["details"]["kind"] == "bad_version"


async def test_shutdown_drains_with_the_listener_closed_then_stops_as_aiohttp_does(
    settings: ServiceSettings,
) -> None:
    trail = Trail()
    async with running(program_of(trail), settings, host="127.0.0.1") as served:
        assert trail.apps[0][HTTP_SERVER] is served.http
    await served.shutdown()  # a second time: nothing more happens

    assert trail.events == ["started", "drain, not accepting", "on_shutdown", "cleaned up"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_stops_on_sigterm_or_sigint_and_shuts_down(
    settings: ServiceSettings, signum: signal.Signals
) -> None:
    trail = Trail()
    before = signal.getsignal(signum)
    serving = asyncio.create_task(serve(program_of(trail), settings, host="127.0.0.1"))
    async with asyncio.timeout(10):
        # Only once the loop handles the signal may it be sent: else it ends the tests.
        while signal.getsignal(signum) == before:
            assert not serving.done()
            await asyncio.sleep(0.01)
    answer = await converse(trail.apps[0][HTTP_SERVER].port, [GET])

    os.kill(os.getpid(), signum)
    async with asyncio.timeout(10):
        await serving

    assert answer.status == 200
    assert trail.events == ["started", "drain, not accepting", "on_shutdown", "cleaned up"]


def _blocking_read_ms(settings: ServiceSettings) -> int:
    return 700


def _pool_size(settings: ServiceSettings) -> int:
    return 3


async def test_the_clients_live_in_cleanup_contexts_under_the_shared_keys(
    settings: ServiceSettings,
) -> None:
    configured: list[object] = []

    async def configure(conn: Any) -> None:
        configured.append(conn)

    app = web.Application()
    app[SETTINGS] = settings
    app[TRACING] = Tracing(provider=None)
    app.cleanup_ctx.extend(
        [
            redis_client(blocking_ms=_blocking_read_ms(settings)),
            postgres_pool(max_size=_pool_size(settings), configure=configure, check=True),
            http_client,
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        redis, pool, session = app[REDIS_AUX], app[PG_POOL], app[HTTP_CLIENT]
        pong = await redis.ping()
        async with pool.connection() as conn:
            selected = await (await conn.execute("SELECT 1")).fetchone()
        socket_timeout = redis.connection_pool.connection_kwargs["socket_timeout"]
    finally:
        await runner.cleanup()

    assert (pong, selected) == (True, (1,))
    assert socket_timeout == settings.health_check_timeout_ms / 1000 + 0.7
    assert (pool.max_size, len(configured) >= 1) == (3, True)
    assert (pool.closed, session.closed) == (True, True)


@pytest.fixture
def operated(settings: ServiceSettings) -> ServiceSettings:
    return dataclasses.replace(settings, environment="production", health_detail_token=OPERATOR)


async def probed(aiohttp_client: AiohttpClient, probes: Probes) -> Any:
    app = web.Application()
    app[PROBES] = probes
    for path, probe in probes.routes():
        app.router.add_get(path, probe)
    return await aiohttp_client(app)


async def details(client: Any, path: str) -> tuple[int, dict[str, Any]]:
    response = await client.get(path, headers=AS_OPERATOR)
    body = await response.json()
    return response.status, {name: d["status"] for name, d in body["details"].items()}


async def test_without_conditions_of_its_own_every_probe_says_the_process_answers(
    aiohttp_client: AiohttpClient, operated: ServiceSettings
) -> None:
    client = await probed(aiohttp_client, Probes(settings=operated, service_id="test"))

    for path in ("/health/liveness", "/health/readiness", "/health/startup", "/health"):
        response = await client.get(path, headers=AS_OPERATOR)
        body = await response.json()
        assert response.status == 200, path
        assert body["details"]["process"]["pid"] == os.getpid(), path
        assert body["details"]["process"]["uptime_s"] >= 0, path


async def test_readiness_follows_the_conditions_and_the_drain_while_startup_passes_once(
    aiohttp_client: AiohttpClient, operated: ServiceSettings
) -> None:
    database_up = False
    draining = False

    def conditions() -> dict[str, CheckResult]:
        return {"database": now_result(database_up, None if database_up else "down")}

    probes = Probes(
        settings=operated,
        service_id="test",
        ready=conditions,
        serving="work",
        draining=lambda: draining,
    )
    client = await probed(aiohttp_client, probes)

    before = [await details(client, p) for p in ("/health/readiness", "/health/startup")]
    database_up = True
    up = [await details(client, p) for p in ("/health/readiness", "/health/startup")]
    database_up = False
    down_again = [await details(client, p) for p in ("/health/readiness", "/health/startup")]
    database_up, draining = True, True
    drained = [await details(client, p) for p in ("/health/readiness", "/health/startup")]

    assert before == [
        (503, {"database": "down", "work": "up"}),
        (503, {"database": "down"}),
    ]
    assert up == [(200, {"database": "up", "work": "up"}), (200, {"database": "up"})]
    assert down_again == [
        (503, {"database": "down", "work": "up"}),
        (200, {"database": "up"}),
    ]
    assert drained == [(503, {"database": "up", "work": "down"}), (200, {"database": "up"})]


async def test_health_reports_the_checkers_last_results(
    aiohttp_client: AiohttpClient, operated: ServiceSettings
) -> None:
    async def failing() -> None:
        raise OSError("refused")

    async def passing() -> None:
        return None

    checker = HealthChecker({"redis": passing, "database": failing}, timeout=1, interval=1)
    await checker.run_once()
    client = await probed(
        aiohttp_client, Probes(settings=operated, service_id="test", checker=checker)
    )

    assert await details(client, "/health") == (503, {"redis": "up", "database": "down"})


def worker_heartbeat(pod: str, sent_ms: int) -> WorkerHeartbeat:
    return WorkerHeartbeat(
        pod=pod,
        boot_id="d" * 32,
        pid=1,
        version="0.1.0",
        started_ms=0,
        sent_ms=sent_ms,
        ready=True,
        draining=False,
        rss_bytes=0,
        heap_bytes=0,
        loop_lag_ms=0.0,
        redis_ok=True,
        telemetry_dropped=0,
    )


async def test_the_heartbeat_loop_writes_what_the_program_builds_with_its_ttl(
    redis: Redis, keys: Keys
) -> None:
    built: list[WorkerHeartbeat] = []

    def build() -> WorkerHeartbeat:
        built.append(worker_heartbeat("pod-h", len(built)))
        return built[-1]

    key = keys.heartbeat("pod-h")
    # A client of its own: the loop is cancelled mid-command, which may leave its
    # connection waiting for a reply nobody reads.
    looping = Redis.from_url(REDIS_URL)
    loop = asyncio.create_task(HeartbeatPublisher(looping, key, build, interval=0.05, ttl=7).run())
    try:
        async with asyncio.timeout(5):
            while len(built) < 3:
                await asyncio.sleep(0.01)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        # Closing a client whose command was cancelled mid-reply can wait on redis-py's
        # connection lock; what is checked here is the loop, not that client's close.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await looping.aclose()
    # The last one, on the way out.
    await HeartbeatPublisher(redis, key, build, interval=0.05, ttl=7).publish()
    raw = await redis.get(key)

    assert raw is not None
    assert decode_heartbeat(raw) == built[-1]
    assert 0 < await redis.ttl(key) <= 7
