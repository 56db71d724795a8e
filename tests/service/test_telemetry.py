"""Telemetry records and the heartbeat that the sidecar reads."""

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.app import create_app
from shared.keys import Keys
from shared.settings import ServiceSettings
from shared.telemetry import BATCH_FIELD, Kind, decode_batch, decode_heartbeat
from tests.support.env import AiohttpClient, Device
from tests.support.telemetry import read_records

Client = TestClient[web.Request, web.Application]


async def test_every_request_and_socket_event_becomes_a_record(
    client: Client, device: Device, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    await client.post("/ingestion/ppg", json=device.batch(1), headers=device.headers)
    await client.post("/ingestion/ppg", json={"x": 1}, headers=device.headers)
    await client.get("/no/such/path/123")
    async with client.ws_connect("/ingestion/ws", headers=device.headers) as ws:
        await ws.send_json(device.batch(2))
        await ws.receive_json()
    await asyncio.sleep(0.3)

    records = await read_records(redis, keys, settings.pod)
    summary = [
        (kind, route, method, status, samples)
        for kind, route, method, status, _, _, samples, _ in records
    ]

    assert (Kind.HTTP, "/ingestion/ppg", "POST", 202, 4) in summary
    assert (Kind.HTTP, "/ingestion/ppg", "POST", 422, 0) in summary
    assert (Kind.HTTP, "unmatched", "GET", 404, 0) in summary
    assert (Kind.WS_OPEN, "/ingestion/ws", "GET", 101, 0) in summary
    assert (Kind.WS_MESSAGE, "/ingestion/ws", "WS", 202, 4) in summary
    assert any(kind == Kind.WS_CLOSE for kind, *_ in summary)


async def test_heartbeat_carries_the_process_snapshot_with_a_ttl(
    client: Client, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    await asyncio.sleep(0.4)

    raw = await redis.get(keys.heartbeat(settings.pod))
    ttl = await redis.ttl(keys.heartbeat(settings.pod))

    assert raw is not None
    heartbeat = decode_heartbeat(raw)
    assert heartbeat.pod == settings.pod
    assert heartbeat.rss_bytes > 0
    assert heartbeat.ready
    assert 0 < ttl <= settings.heartbeat_ttl


async def test_records_beyond_the_buffer_bound_are_dropped_and_counted(
    client: Client, device: Device, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    telemetry = client.app[__import__("service.appkeys", fromlist=["INGEST"]).INGEST].telemetry
    telemetry._buffer_max = 2
    await client.post("/ingestion/ppg", json=device.batch(1), headers=device.headers)
    await asyncio.sleep(0.3)
    for seq in range(2, 7):
        await client.post("/ingestion/ppg", json=device.batch(seq), headers=device.headers)
    await asyncio.sleep(0.3)

    entries = await redis.xrange(keys.telemetry(settings.pod))
    last = decode_batch(entries[-1][1][BATCH_FIELD])

    assert last.dropped_total == telemetry.dropped > 0


async def test_the_telemetry_stream_expires_when_the_pod_is_gone(
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    redis: Redis,
    keys: Keys,
) -> None:
    client = await aiohttp_client(create_app(settings))
    await client.post("/ingestion/ppg", json=device.batch(1), headers=device.headers)

    async with asyncio.timeout(5):
        while (ttl := await redis.ttl(keys.telemetry(settings.pod))) < 0:
            await asyncio.sleep(0.02)

    assert 0 < ttl <= settings.sidecar_state_ttl
