"""Fixtures: the real app against the real Redis and Postgres, isolated per test.

Each test gets its own Redis key prefix and the session its own Postgres schema, so tests
share the machine's servers without seeing each other's data.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.app import create_app
from shared.devices import add_device
from shared.keys import Keys
from shared.schema import upgrade_schema
from shared.settings import ServiceSettings, SidecarSettings
from tests.support.env import POSTGRES_URL, REDIS_URL, AiohttpClient, Device, DeviceFactory
from tests.support.procs import ServiceProcess
from tests.support.settings import for_program
from tests.support.worker import WorkerProcess


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh schema in the ``test`` database, migrated, dropped at the end."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    yield url
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
def migrated(database_url: str) -> str:
    async def upgrade() -> None:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            await upgrade_schema(conn)

    asyncio.run(upgrade())
    return database_url


@pytest.fixture
def key_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def redis(key_prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def aiohttp_client(redis: Redis, aiohttp_client: AiohttpClient) -> AiohttpClient:
    """pytest-aiohttp's client, torn down before ``redis`` cleans the test's keys.

    The app writes its last telemetry and heartbeat while it shuts down; setting ``redis``
    up first (so it is torn down last) makes sure that happens before the cleanup.
    """
    return aiohttp_client


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
def settings(migrated: str, key_prefix: str, tmp_path: Any) -> ServiceSettings:
    return ServiceSettings(
        port=0,
        pod_name=f"pod-{key_prefix.split(':')[1]}",
        redis_url=REDIS_URL,
        redis_key_prefix=key_prefix,
        database_url=migrated,
        log_dir=str(tmp_path),
        health_check_interval=0.2,
        health_check_timeout_ms=1000,
        token_refresh_interval=0.1,
        backlog_check_interval=0.05,
        telemetry_flush_interval=0.05,
        heartbeat_interval=0.2,
        heartbeat_ttl=2,
        shutdown_timeout=2.0,
        write_timeout=1.0,
        max_body_bytes=64 * 1024,
    )


@pytest.fixture
def make_device(migrated: str) -> DeviceFactory:
    async def make() -> Device:
        device_id = f"dev-{uuid.uuid4().hex[:12]}"
        async with await psycopg.AsyncConnection.connect(migrated) as conn:
            token = await add_device(conn, device_id)
        return Device(device_id, token)

    return make


@pytest.fixture
async def device(make_device: DeviceFactory) -> Device:
    return await make_device()


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device, redis: Redis
) -> TestClient[web.Request, web.Application]:
    """The service with ``device`` registered before it started (so its token is cached)."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def sidecar_settings(settings: ServiceSettings) -> SidecarSettings:
    """The sidecar of the same pod as ``settings``' service, reading and saving often."""
    return for_program(
        SidecarSettings,
        settings,
        sidecar_port=0,
        sidecar_block_ms=100,
        sidecar_checkpoint_interval=0.1,
    )


@pytest.fixture
async def processes() -> AsyncIterator[list[ServiceProcess | WorkerProcess]]:
    """Service and worker processes a test starts: killed after it, their output's tail
    printed (shown with a failure)."""
    started: list[ServiceProcess | WorkerProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            print(process.output()[-20_000:])
