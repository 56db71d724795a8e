"""Probes and the full health report, served from the background checker's cache."""

import asyncio
import dataclasses

from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.appkeys import CHECKER
from shared.settings import Settings

from .conftest import AiohttpClient

Client = TestClient[web.Request, web.Application]


async def wait_for_checks(client: Client) -> None:
    """Until the background checker has finished its first round."""
    async with asyncio.timeout(5):
        while client.app[CHECKER].rounds == 0:
            await asyncio.sleep(0.05)


async def test_healthy_service_passes_every_probe(client: Client) -> None:
    await wait_for_checks(client)

    for path in ("/health/liveness", "/health/readiness", "/health/startup"):
        assert (await client.get(path)).status == 200, path
    body = await (await client.get("/health")).json()
    assert body["status"] == "ok"
    assert set(body["details"]) == {
        "database",
        "redis",
        "ai-services",
        "memory_heap",
        "memory_rss",
        "disk",
    }
    assert body["error"] == {}


async def test_health_json_is_served_when_asked_for(client: Client) -> None:
    await wait_for_checks(client)

    response = await client.get("/health", headers={"Accept": "application/health+json"})

    assert response.content_type == "application/health+json"
    body = await response.json(content_type=None)
    assert body["status"] == "pass"
    assert body["checks"]["redis:status"][0]["status"] == "pass"


async def test_redis_down_makes_the_pod_unready_but_alive(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    dead = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    client = await aiohttp_client(create_app(dead))
    await wait_for_checks(client)

    readiness = await client.get("/health/readiness")
    health = await (await client.get("/health")).json()

    assert readiness.status == 503
    assert (await client.get("/health/startup")).status == 503
    assert (await client.get("/health/liveness")).status == 200
    assert health["status"] == "error"
    assert health["error"]["redis"]["status"] == "down"


async def test_database_down_shows_in_health_without_blocking_ingestion_readiness(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    dead = dataclasses.replace(settings, database_url="postgresql://postgres@127.0.0.1:1/x")
    client = await aiohttp_client(create_app(dead))
    await wait_for_checks(client)

    health = await (await client.get("/health")).json()
    readiness = await (await client.get("/health/readiness")).json()

    assert health["error"]["database"]["status"] == "down"
    # Without a first token load nothing can be authenticated, so the pod is not ready yet.
    assert readiness["error"]["device_tokens"]["status"] == "down"


async def test_unreachable_ai_service_is_reported_down(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    broken = dataclasses.replace(settings, ai_service_url="http://127.0.0.1:1")
    client = await aiohttp_client(create_app(broken))
    await wait_for_checks(client)

    body = await (await client.get("/health")).json()

    assert body["error"]["ai-services"]["url"] == "http://127.0.0.1:1"
    assert (await client.get("/health/readiness")).status == 200
