"""Probes and the full health report, served from the background checker's cache: anyone
gets the verdict, the operator (the operator token) the details."""

import asyncio
import dataclasses

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from shared.appkeys import CHECKER
from shared.settings import ServiceSettings
from tests.support.env import AiohttpClient, Device

Client = TestClient[web.Request, web.Application]
OPERATOR = "operator-token-for-tests"
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR}"}
PROBES = ("/health/liveness", "/health/readiness", "/health/startup", "/health")


@pytest.fixture
def operated(settings: ServiceSettings) -> ServiceSettings:
    """A production service whose operator holds ``OPERATOR``."""
    return dataclasses.replace(settings, environment="production", health_detail_token=OPERATOR)


@pytest.fixture
async def operated_client(
    aiohttp_client: AiohttpClient, operated: ServiceSettings, device: Device
) -> Client:
    """The service with ``device`` registered before it started (so its token is cached)."""
    return await aiohttp_client(create_app(operated))


async def wait_for_checks(client: Client) -> None:
    """Until the background checker has finished its first round."""
    async with asyncio.timeout(5):
        while client.app[CHECKER].rounds == 0:
            await asyncio.sleep(0.05)


async def test_healthy_service_passes_every_probe(operated_client: Client) -> None:
    client = operated_client
    await wait_for_checks(client)

    for path in ("/health/liveness", "/health/readiness", "/health/startup"):
        assert (await client.get(path)).status == 200, path
    body = await (await client.get("/health", headers=AS_OPERATOR)).json()
    assert body["status"] == "ok"
    assert set(body["details"]) == {
        "database",
        "redis",
        "ai-services",
        "memory_heap",
        "memory_rss",
        "disk",
        "redis-replication",
    }
    assert body["details"]["redis-replication"] == {
        "status": "up",
        "ackMode": "primary",
        "role": "primary",
        "replicasOnline": 0,
        "replicasRequired": 0,
        "lagSeconds": 0,
    }
    assert body["error"] == {}


async def test_without_the_operator_token_every_probe_answers_its_status_alone(
    operated_client: Client,
) -> None:
    client = operated_client
    await wait_for_checks(client)

    for path in PROBES:
        anonymous = await client.get(path)
        wrong = await client.get(path, headers={"Authorization": "Bearer not-the-token"})
        as_json = await client.get(path, headers={"Accept": "application/health+json"})
        operator = await client.get(path, headers=AS_OPERATOR)

        assert (anonymous.status, await anonymous.json()) == (200, {"status": "ok"}), path
        assert (wrong.status, await wrong.json()) == (200, {"status": "ok"}), path
        assert as_json.content_type == "application/health+json"
        assert await as_json.json(content_type=None) == {"status": "pass"}, path
        assert "details" in await operator.json(), path


async def test_a_failing_probe_says_error_with_503_and_nothing_more(
    aiohttp_client: AiohttpClient, operated: ServiceSettings
) -> None:
    dead = dataclasses.replace(operated, redis_url="redis://127.0.0.1:1/0")
    client = await aiohttp_client(create_app(dead))
    await wait_for_checks(client)

    readiness = await client.get("/health/readiness")
    health = await client.get("/health", headers={"Accept": "application/health+json"})

    assert (readiness.status, await readiness.json()) == (503, {"status": "error"})
    assert (health.status, await health.json(content_type=None)) == (503, {"status": "fail"})


async def test_the_metrics_token_sees_the_details_when_no_detail_token_is_set(
    aiohttp_client: AiohttpClient, settings: ServiceSettings
) -> None:
    scrape_token = "scrape-token"  # noqa: S105 - a test's own token, not a secret
    metrics_token = dataclasses.replace(
        settings, environment="production", metrics_token=scrape_token
    )
    service = await aiohttp_client(create_app(metrics_token))

    anonymous = await (await service.get("/health/liveness")).json()
    operator = await (
        await service.get("/health/liveness", headers={"Authorization": "Bearer scrape-token"})
    ).json()

    assert anonymous == {"status": "ok"}
    assert operator["details"]["process"]["pid"] > 0


@pytest.mark.parametrize(("environment", "details"), [("development", True), ("production", False)])
async def test_without_any_token_only_development_shows_details(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, environment: str, details: bool
) -> None:
    untokened = dataclasses.replace(
        settings, environment=environment, metrics_token=None, health_detail_token=None
    )
    client = await aiohttp_client(create_app(untokened))

    body = await (await client.get("/health/liveness")).json()

    assert ("details" in body) is details


async def test_health_json_is_served_when_asked_for(operated_client: Client) -> None:
    client = operated_client
    await wait_for_checks(client)

    response = await client.get(
        "/health", headers={"Accept": "application/health+json", **AS_OPERATOR}
    )

    assert response.content_type == "application/health+json"
    body = await response.json(content_type=None)
    assert body["status"] == "pass"
    assert body["checks"]["redis:status"][0]["status"] == "pass"


async def test_no_answer_names_the_server_s_versions(operated_client: Client) -> None:
    client = operated_client

    answers = [
        await client.get("/health/liveness"),
        await client.get("/nowhere"),
        await client.post("/ingestion/ppg", data=b"{}"),
    ]

    assert [a.headers.get("Server") for a in answers] == ["pulsecal"] * 3


async def test_redis_down_makes_the_pod_unready_but_alive(
    aiohttp_client: AiohttpClient, operated: ServiceSettings
) -> None:
    dead = dataclasses.replace(operated, redis_url="redis://127.0.0.1:1/0")
    client = await aiohttp_client(create_app(dead))
    await wait_for_checks(client)

    readiness = await client.get("/health/readiness")
    health = await (await client.get("/health", headers=AS_OPERATOR)).json()

    assert readiness.status == 503
    assert (await client.get("/health/startup")).status == 503
    assert (await client.get("/health/liveness")).status == 200
    assert health["status"] == "error"
    assert health["error"]["redis"]["status"] == "down"


async def test_database_down_shows_in_health_without_blocking_ingestion_readiness(
    aiohttp_client: AiohttpClient, operated: ServiceSettings
) -> None:
    dead = dataclasses.replace(operated, database_url="postgresql://postgres@127.0.0.1:1/x")
    client = await aiohttp_client(create_app(dead))
    await wait_for_checks(client)

    health = await (await client.get("/health", headers=AS_OPERATOR)).json()
    readiness = await (await client.get("/health/readiness", headers=AS_OPERATOR)).json()

    assert health["error"]["database"]["status"] == "down"
    # Without a first token load nothing can be authenticated, so the pod is not ready yet.
    assert readiness["error"]["device_tokens"]["status"] == "down"


async def test_unreachable_ai_service_is_reported_down(
    aiohttp_client: AiohttpClient, operated: ServiceSettings
) -> None:
    broken = dataclasses.replace(operated, ai_service_url="http://127.0.0.1:1")
    client = await aiohttp_client(create_app(broken))
    await wait_for_checks(client)

    body = await (await client.get("/health", headers=AS_OPERATOR)).json()

    assert body["error"]["ai-services"]["url"] == "http://127.0.0.1:1"
    assert (await client.get("/health/readiness")).status == 200
