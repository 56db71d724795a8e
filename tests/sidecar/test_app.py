"""The sidecar app against the real Redis and Postgres: consumption, checkpoints, endpoints."""

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from shared.access import COOKIE
from shared.httpserver import SERVER
from shared.keys import Keys
from shared.settings import ServiceSettings, SidecarSettings
from shared.telemetry import BATCH_FIELD, HeartbeatBase, WorkerHeartbeat, encode_heartbeat
from sidecar.app import create_app
from sidecar.appkeys import CONSUMER
from sidecar.consumer import TelemetryConsumer
from tests.support.env import AiohttpClient, Device
from tests.support.procs import free_port
from tests.support.sidecar import heartbeat, http_record, promtool_check, total, xadd_batch

Client = TestClient[web.Request, web.Application]
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
OPERATOR = "operator-token-for-tests"
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR}"}


@pytest.fixture
def sidecar_settings(sidecar_settings: SidecarSettings) -> SidecarSettings:
    """A production sidecar whose operator holds ``OPERATOR``."""
    return dataclasses.replace(
        sidecar_settings, environment="production", health_detail_token=OPERATOR
    )


async def eventually(
    probe: Callable[[], Awaitable[bool]], *, within: float = 5.0, every: float = 0.05
) -> None:
    async with asyncio.timeout(within):
        while not await probe():
            await asyncio.sleep(every)


async def metrics_text(sidecar: Client, **headers: str) -> str:
    response = await sidecar.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    return await response.text()


async def wait_for_requests(sidecar: Client, expected: int, **labels: str) -> str:
    text = ""

    async def seen() -> bool:
        nonlocal text
        text = await metrics_text(sidecar)
        return total(text, "http_requests_total", **labels) >= expected

    await eventually(seen)
    return text


async def test_requests_the_service_answers_appear_in_metrics(
    client: Client, device: Device, aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    sidecar = await aiohttp_client(create_app(sidecar_settings))
    for seq in range(5):
        await client.post("/ingestion/ppg", json=device.batch(seq), headers=device.headers)
    await client.post("/ingestion/ppg", json={"nope": 1}, headers=device.headers)
    async with client.ws_connect("/ingestion/ws", headers=device.headers) as ws:
        await ws.send_json(device.batch(99))
        await ws.receive_json()

    text = await wait_for_requests(sidecar, 6, route="/ingestion/ppg")

    assert total(text, "http_requests_total", route="/ingestion/ppg", status="202") == 5
    assert total(text, "http_request_errors_total", status="422") == 1
    assert total(text, "http_request_duration_seconds_count", route="/ingestion/ppg") == 6
    assert total(text, "metrics_ingested_total", transport="http") == 20
    await eventually(lambda: _has(sidecar, "websocket_messages_total", 1, status="202"), within=3)
    assert '\nalerts_created_total{rule="hr_high"} 0' in text
    for seed_metric in (
        "ai_analysis_completed_total",
        "ai_analysis_failed_total",
        "websocket_connections_active",
        "queue_jobs_active",
        "queue_depth",
        "database_connections_active",
    ):
        assert f"\n{seed_metric} " in text, seed_metric


async def _has(sidecar: Client, name: str, value: float, **labels: str) -> bool:
    return total(await metrics_text(sidecar), name, **labels) == value


async def test_service_process_metrics_come_from_its_heartbeat(
    client: Client, aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    await eventually(lambda: _has(sidecar, "pulsecal_service_up", 1))

    text = await metrics_text(sidecar)
    assert total(text, "pulsecal_service_resident_memory_bytes") > 0
    assert total(text, "pulsecal_service_device_tokens") >= 1
    assert total(text, "pulsecal_service_info", program="pulsecal-service") == 1


async def test_beside_a_worker_the_metrics_come_from_the_workers_heartbeat(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    service = heartbeat(pod)
    worker = WorkerHeartbeat(
        **{name: getattr(service, name) for name in HeartbeatBase.__struct_fields__},
        queue_depth=6,
        queue_jobs_active=2,
        readings_lag=17,
        alerts_open=3,
        ai_circuit="open",
    )
    await redis.set(keys.heartbeat(pod), encode_heartbeat(worker))
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    await eventually(lambda: _has(sidecar, "pulsecal_service_up", 1))
    text = await metrics_text(sidecar)

    assert total(text, "pulsecal_service_info", program="pulsecal-worker") == 1
    assert total(text, "queue_depth") == 6
    assert total(text, "queue_jobs_active") == 2
    assert total(text, "pulsecal_worker_readings_lag") == 17
    assert total(text, "pulsecal_worker_ai_circuit_open") == 1
    # The service's own series are there, at 0, as they always were beside a worker.
    assert total(text, "websocket_connections_active") == 0
    assert total(text, "pulsecal_service_writes_total") == 0
    assert total(text, "pulsecal_service_http_connections") == 0
    # A worker from before partitions measures none: the family is there, without series.
    assert "# TYPE pulsecal_worker_partition_backlog gauge" in text
    assert "\npulsecal_worker_partition_backlog{" not in text


def worker_heartbeat(pod: str, partition_backlog: dict[str, int]) -> WorkerHeartbeat:
    service = heartbeat(pod)
    return WorkerHeartbeat(
        **{name: getattr(service, name) for name in HeartbeatBase.__struct_fields__},
        readings_lag=sum(partition_backlog.values()),
        partition_backlog=partition_backlog,
    )


async def test_beside_a_worker_each_partitions_backlog_is_a_series(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    backlog = {f"{i}/12": 40 * i for i in range(12)} | {"3/12": 9000}
    await redis.set(keys.heartbeat(pod), encode_heartbeat(worker_heartbeat(pod, backlog)))
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    await eventually(lambda: _has(sidecar, "pulsecal_service_up", 1))
    text = await metrics_text(sidecar)
    openmetrics = await metrics_text(sidecar, Accept=OPENMETRICS)

    for name, n in backlog.items():
        assert total(text, "pulsecal_worker_partition_backlog", partition=name) == n
    lines = [line for line in text.splitlines() if line.startswith("pulsecal_worker_partition")]
    assert lines[:3] == [
        'pulsecal_worker_partition_backlog{partition="0/12"} 0',
        'pulsecal_worker_partition_backlog{partition="1/12"} 40',
        'pulsecal_worker_partition_backlog{partition="2/12"} 80',
    ]
    assert lines[-1] == 'pulsecal_worker_partition_backlog{partition="11/12"} 440'
    assert "take the max by partition" in text  # the HELP text says how to aggregate
    assert 'pulsecal_worker_partition_backlog{partition="3/12"} 9000\n' in openmetrics
    assert (await promtool_check(text))[0] == 0


async def test_a_partition_name_is_escaped_in_its_label(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    odd = 'a"b\\c\nd'
    await redis.set(
        keys.heartbeat(pod), encode_heartbeat(worker_heartbeat(pod, {odd: 5, "0/1": 7}))
    )
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    await eventually(lambda: _has(sidecar, "pulsecal_service_up", 1))
    text = await metrics_text(sidecar)

    assert 'pulsecal_worker_partition_backlog{partition="a\\"b\\\\c\\nd"} 5' in text
    assert total(text, "pulsecal_worker_partition_backlog", partition=odd) == 5
    assert total(text, "pulsecal_worker_partition_backlog", partition="0/1") == 7
    code, output = await promtool_check(text)
    assert code == 0, output + text


async def test_beside_a_worker_the_dashboard_names_the_largest_partition_backlog(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    backlog = {f"{i}/12": 10 for i in range(12)} | {"7/12": 4500}
    await redis.set(keys.heartbeat(pod), encode_heartbeat(worker_heartbeat(pod, backlog)))
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    await eventually(lambda: _has(sidecar, "pulsecal_service_up", 1))
    page = await (await sidecar.get("/dashboard/live", headers=AS_OPERATOR)).text()

    assert "<dt>partitions</dt><dd>12 · largest backlog 4,500 entries on 7/12</dd>" in page


async def test_a_restarted_sidecar_resumes_with_matching_totals(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    for _ in range(3):
        await xadd_batch(redis, keys, pod, [http_record()] * 10)
    first = await aiohttp_client(create_app(sidecar_settings))
    await wait_for_requests(first, 30)
    await first.close()  # saves the checkpoint on the way out

    for _ in range(2):
        await xadd_batch(redis, keys, pod, [http_record()] * 10)
    second = await aiohttp_client(create_app(sidecar_settings))
    text = await wait_for_requests(second, 50)
    await asyncio.sleep(0.3)  # anything counted twice would show up by now

    assert total(await metrics_text(second), "http_requests_total") == 50
    assert total(text, "pulsecal_sidecar_records_consumed_total") == 50


async def test_a_scrape_is_never_ahead_of_the_checkpoint(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    # Checkpoints only when scraped: a kill right after a scrape loses nothing it showed.
    settings = dataclasses.replace(sidecar_settings, sidecar_checkpoint_interval=3600)
    sidecar = await aiohttp_client(create_app(settings))
    await xadd_batch(redis, keys, settings.pod, [http_record()] * 7)
    await wait_for_requests(sidecar, 7)

    consumer = TelemetryConsumer(
        redis,
        stream=keys.telemetry(settings.pod),
        state_key=keys.sidecar_state(settings.pod),
        max_series=100,
        read_count=10,
        block_ms=10,
        checkpoint_interval=1,
        state_ttl=60,
    )
    saved = await consumer.load()

    assert saved.http_requests == 7


async def test_entries_trimmed_before_being_read_are_counted_as_a_gap(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    for _ in range(5):
        await xadd_batch(redis, keys, pod, [http_record()], maxlen=2)

    sidecar = await aiohttp_client(create_app(sidecar_settings))
    text = await wait_for_requests(sidecar, 2)

    assert total(text, "pulsecal_telemetry_gap_entries_total") == 3
    assert total(text, "http_requests_total") == 2


async def test_a_recreated_stream_is_read_from_its_start(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    await xadd_batch(redis, keys, pod, [http_record()] * 4)
    await xadd_batch(redis, keys, pod, [http_record()] * 4)
    sidecar = await aiohttp_client(create_app(sidecar_settings))
    await wait_for_requests(sidecar, 8)

    await redis.delete(keys.telemetry(pod))  # as if Redis had lost its data
    await xadd_batch(redis, keys, pod, [http_record()] * 3, sent_ms=1)
    text = await wait_for_requests(sidecar, 11)

    assert total(text, "pulsecal_sidecar_stream_resets_total") == 1
    assert total(text, "http_requests_total") == 11


async def test_an_undecodable_entry_is_skipped_and_counted(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    await redis.xadd(keys.telemetry(pod), {BATCH_FIELD: b"\xc1 not msgpack"})
    await redis.xadd(keys.telemetry(pod), {b"other": b"field"})
    await xadd_batch(redis, keys, pod, [http_record()])

    sidecar = await aiohttp_client(create_app(sidecar_settings))
    text = await wait_for_requests(sidecar, 1)

    assert total(text, "pulsecal_sidecar_decode_errors_total") == 2
    assert total(text, "pulsecal_sidecar_entries_consumed_total") == 3


async def test_lag_and_backlog_measure_the_distance_to_the_stream_head(
    redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    stream = keys.telemetry(settings.pod)
    for entry_id in ("1000-0", "2000-0", "5000-0"):
        await redis.xadd(stream, {BATCH_FIELD: b"x"}, id=entry_id)
    consumer = TelemetryConsumer(
        redis,
        stream=stream,
        state_key=keys.sidecar_state(settings.pod),
        max_series=100,
        read_count=1,
        block_ms=10,
        checkpoint_interval=1,
        state_ttl=60,
    )
    await consumer.load()

    await consumer.read_once()
    behind = (consumer.backlog, consumer.lag_s)
    await consumer.read_once()
    await consumer.read_once()

    assert behind == (2, 4.0)
    assert (consumer.backlog, consumer.lag_s) == (0, 0.0)


async def test_metrics_need_the_token_when_one_is_set(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    token = "s3cret"  # noqa: S105 - a test's own token, not a secret
    settings = dataclasses.replace(sidecar_settings, metrics_token=token)
    sidecar = await aiohttp_client(create_app(settings))

    without = await sidecar.get("/metrics")
    wrong = await sidecar.get("/metrics", headers={"Authorization": "Bearer nope"})
    await eventually(lambda: _loaded(sidecar))
    right = await sidecar.get("/metrics", headers={"Authorization": f"Bearer {token}"})

    assert without.status == 401
    assert without.headers["WWW-Authenticate"].startswith("Bearer")
    assert wrong.status == 401
    assert right.status == 200
    assert (await sidecar.get("/health/liveness")).status == 200


async def _loaded(sidecar: Client) -> bool:
    return sidecar.app[CONSUMER].aggregator is not None


async def test_metrics_disabled_means_no_endpoint_and_no_consumption(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    settings = dataclasses.replace(sidecar_settings, metrics_enabled=False)
    await xadd_batch(redis, keys, settings.pod, [http_record()])
    sidecar = await aiohttp_client(create_app(settings))
    await asyncio.sleep(0.3)

    metrics = await sidecar.get("/metrics")
    health = await sidecar.get("/health", headers=AS_OPERATOR)
    page = await sidecar.get("/", headers=AS_OPERATOR)

    assert metrics.status == 404
    assert "service" in (await health.json())["details"]
    assert page.status == 200
    assert "METRICS_ENABLED=false" in await page.text()
    assert await redis.exists(keys.sidecar_state(settings.pod)) == 0


async def test_openmetrics_is_served_on_request_with_exemplars(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    trace = "0af7651916cd43dd8448eb211c80319c"
    await xadd_batch(redis, keys, sidecar_settings.pod, [http_record(trace_id=trace)])
    sidecar = await aiohttp_client(create_app(sidecar_settings))
    await wait_for_requests(sidecar, 1)

    response = await sidecar.get("/metrics", headers={"Accept": OPENMETRICS})
    text = await response.text()

    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert f'# {{trace_id="{trace}"}}' in text
    assert text.endswith("# EOF\n")


async def test_the_full_exposition_passes_promtool(
    client: Client,
    device: Device,
    aiohttp_client: AiohttpClient,
    sidecar_settings: SidecarSettings,
    redis: Redis,
    keys: Keys,
) -> None:
    await client.post("/ingestion/ppg", json=device.batch(1), headers=device.headers)
    await client.get("/nowhere")
    async with client.ws_connect("/ingestion/ws", headers=device.headers) as ws:
        await ws.send_json(device.batch(2))
        await ws.receive_json()
    sidecar = await aiohttp_client(create_app(sidecar_settings))
    await eventually(lambda: _has(sidecar, "pulsecal_service_up", 1))
    await wait_for_requests(sidecar, 2)

    text = await metrics_text(sidecar)
    code, output = await promtool_check(text)

    assert code == 0, output + text


async def results(sidecar: Client) -> tuple[int, dict[str, dict[str, object]]]:
    response = await sidecar.get("/health", headers=AS_OPERATOR)
    body = await response.json()
    return response.status, body["details"]


async def checked_once(sidecar: Client) -> bool:
    """Whether every check has run at least once (before, each says "not checked yet")."""
    _, details = await results(sidecar)
    return all(d.get("message") != "not checked yet" for d in details.values())


async def test_health_reports_the_service_down_when_its_heartbeat_goes_stale(
    client: Client, aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    async def service_up() -> bool:
        _, details = await results(sidecar)
        return details["service"]["status"] == "up"

    async def heartbeat_gone() -> bool:
        _, details = await results(sidecar)
        return "no heartbeat" in str(details["service"].get("message"))

    await eventually(service_up)
    await client.close()  # the service stops; its last heartbeat expires after HEARTBEAT_TTL
    await eventually(heartbeat_gone, within=sidecar_settings.heartbeat_ttl + 3)

    status, details = await results(sidecar)
    assert status == 503
    assert details["service"]["status"] == "down"
    assert details["redis"]["status"] == "up"


async def test_a_heartbeat_older_than_its_ttl_is_stale(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, redis: Redis, keys: Keys
) -> None:
    pod = sidecar_settings.pod
    # Written without an expiry, so only its age tells that it is stale.
    await redis.set(keys.heartbeat(pod), encode_heartbeat(heartbeat(pod, age_s=60)))
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    await eventually(lambda: checked_once(sidecar))
    status, details = await results(sidecar)

    assert status == 503
    assert "stale heartbeat" in str(details["service"]["message"])


async def test_health_reports_postgres_down_when_it_cannot_be_reached(
    client: Client, aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    sidecar = await aiohttp_client(
        create_app(dataclasses.replace(sidecar_settings, database_url=closed))
    )

    async def service_up() -> bool:
        _, details = await results(sidecar)
        return details["service"]["status"] == "up"

    await eventually(lambda: checked_once(sidecar))
    await eventually(service_up)
    response = await sidecar.get("/health", headers=AS_OPERATOR)
    body = await response.json()

    assert response.status == 503
    assert set(body["error"]) == {"database"}
    assert "refused" in body["error"]["database"]["message"].lower()
    assert {"service", "redis", "ai-services", "memory_heap", "memory_rss", "disk"} <= set(
        body["info"]
    )


async def test_health_json_is_served_when_asked_for(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    response = await sidecar.get(
        "/health", headers={"Accept": "application/health+json", **AS_OPERATOR}
    )
    body = await response.json(content_type=None)

    assert response.headers["Content-Type"].startswith("application/health+json")
    assert "service:status" in body["checks"]


async def test_without_redis_the_dashboard_says_so_and_liveness_still_passes(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    sidecar = await aiohttp_client(
        create_app(dataclasses.replace(sidecar_settings, redis_url=dead))
    )

    await eventually(lambda: checked_once(sidecar))
    page = await (await sidecar.get("/dashboard/live", headers=AS_OPERATOR)).text()
    metrics = await sidecar.get("/metrics")

    assert 'data-degraded="redis"' in page
    assert "Redis is unreachable" in page
    assert metrics.status == 503
    assert (await sidecar.get("/health/liveness")).status == 200


async def test_the_dashboard_escapes_what_it_shows(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    settings = dataclasses.replace(sidecar_settings, pod_name="<script>alert(1)</script>")
    sidecar = await aiohttp_client(create_app(settings))

    page = await (await sidecar.get("/", headers=AS_OPERATOR)).text()

    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_the_dashboard_is_the_operator_s(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    page = await sidecar.get("/")
    live = await sidecar.get("/dashboard/live")
    wrong = await sidecar.post("/signin", data={"token": "not-it"})
    bearer = await sidecar.get("/", headers=AS_OPERATOR)

    assert page.status == 401
    assert 'action="/signin"' in await page.text()
    assert live.status == 401
    assert wrong.status == 401
    assert "not the token" in await wrong.text()
    assert bearer.status == 200
    assert 'data-component="redis"' in await bearer.text()


async def test_signing_in_sets_a_cookie_that_opens_the_dashboard_but_not_the_metrics(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    settings = dataclasses.replace(sidecar_settings, metrics_token=OPERATOR)
    sidecar = await aiohttp_client(create_app(settings))

    signed_in = await sidecar.post("/signin", data={"token": OPERATOR}, allow_redirects=False)
    cookie = signed_in.cookies[COOKIE]
    page = await sidecar.get("/")
    live = await sidecar.get("/dashboard/live")
    health = await sidecar.get("/health")
    metrics = await sidecar.get("/metrics")

    assert (signed_in.status, signed_in.headers["Location"]) == (303, "/")
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert OPERATOR not in cookie.value
    assert (page.status, live.status) == (200, 200)
    assert "details" in await health.json()
    assert metrics.status == 401  # the cookie is the dashboard's, the scrape needs the token


@pytest.mark.parametrize(("environment", "status"), [("development", 200), ("production", 403)])
async def test_without_any_token_the_dashboard_opens_only_in_development(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, environment: str, status: int
) -> None:
    untokened = dataclasses.replace(
        sidecar_settings, environment=environment, health_detail_token=None, metrics_token=None
    )
    sidecar = await aiohttp_client(create_app(untokened))

    page = await sidecar.get("/")
    health = await (await sidecar.get("/health")).json()

    assert page.status == status
    assert ("details" in health) is (environment == "development")


async def test_sidecar_health_answers_anyone_its_status_alone(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    sidecar = await aiohttp_client(create_app(sidecar_settings))
    await eventually(lambda: checked_once(sidecar))

    health = await sidecar.get("/health")
    liveness = await sidecar.get("/health/liveness")

    assert set(await health.json()) == {"status"}
    assert (liveness.status, await liveness.json()) == (200, {"status": "ok"})


async def test_no_sidecar_answer_names_the_server_s_versions(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    sidecar = await aiohttp_client(create_app(sidecar_settings))

    answers = [
        await sidecar.get(path)
        for path in ("/", "/health", "/health/liveness", "/metrics", "/static/dashboard.css", "/no")
    ]

    assert [a.headers.get("Server") for a in answers] == [SERVER] * len(answers)
