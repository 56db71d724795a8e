"""The WebSocket ingestion contract: acks, errors that keep the connection, protocol abuse."""

import asyncio
from dataclasses import replace

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from shared.keys import Keys
from shared.settings import Settings

from .conftest import AiohttpClient, Device

Client = TestClient[web.Request, web.Application]
URL = "/ingestion/ws"


async def test_each_batch_is_acked_and_stored(
    client: Client, device: Device, redis: Redis, keys: Keys
) -> None:
    async with client.ws_connect(URL, headers=device.headers) as ws:
        for seq in (1, 2, 3):
            await ws.send_json(device.batch(seq))
            assert await ws.receive_json() == {"ack": seq}

    entries = await redis.xrange(keys.readings)
    assert [msgspec.json.decode(f[b"d"])["seq"] for _, f in entries] == [1, 2, 3]


async def test_retried_batch_is_acked_as_duplicate(
    client: Client, device: Device, redis: Redis, keys: Keys
) -> None:
    async with client.ws_connect(URL, headers=device.headers) as ws:
        await ws.send_json(device.batch(5))
        first = await ws.receive_json()
        await ws.send_json(device.batch(5))
        retry = await ws.receive_json()

    assert (first, retry) == ({"ack": 5}, {"ack": 5, "duplicate": True})
    assert await redis.xlen(keys.readings) == 1


async def test_bad_messages_get_errors_and_the_connection_stays(
    client: Client, device: Device
) -> None:
    async with client.ws_connect(URL, headers=device.headers) as ws:
        await ws.send_str("{not json")
        malformed = await ws.receive_json()
        await ws.send_json(device.batch(9, rate_hz=-1))
        invalid = await ws.receive_json()
        await ws.send_json(device.batch(10, device_id="another-device"))
        forbidden = await ws.receive_json()
        await ws.send_json(device.batch(11))
        accepted = await ws.receive_json()

    assert (malformed["seq"], malformed["error"]["status"]) == (None, 400)
    assert (invalid["seq"], invalid["error"]["status"]) == (9, 422)
    assert invalid["error"]["details"] == {"field": "rate_hz"}
    assert (forbidden["seq"], forbidden["error"]["status"]) == (10, 403)
    assert accepted == {"ack": 11}


async def test_connection_without_token_is_refused_with_401(client: Client) -> None:
    response = await client.get(URL, headers={"Upgrade": "websocket", "Connection": "Upgrade"})

    assert response.status == 401


async def test_binary_frame_closes_with_unsupported_data(client: Client, device: Device) -> None:
    async with client.ws_connect(URL, headers=device.headers) as ws:
        await ws.send_bytes(b"\x00\x01junk")
        message = await ws.receive()

    assert message.type is WSMsgType.CLOSE
    assert ws.close_code == WSCloseCode.UNSUPPORTED_DATA


async def test_oversized_frame_closes_with_message_too_big(client: Client, device: Device) -> None:
    async with client.ws_connect(URL, headers=device.headers) as ws:
        await ws.send_str("x" * (64 * 1024 + 1))
        message = await ws.receive()

    assert message.type is WSMsgType.CLOSE
    assert ws.close_code == WSCloseCode.MESSAGE_TOO_BIG


async def test_invalid_utf8_text_closes_with_invalid_text(client: Client, device: Device) -> None:
    async with client.ws_connect(URL, headers=device.headers) as ws:
        # A text frame (opcode 1) whose payload is not UTF-8, written below the client API.
        writer = ws._writer
        await writer.send_frame(b"\xff\xfe", WSMsgType.TEXT)
        message = await ws.receive()

    assert message.type is WSMsgType.CLOSE
    assert ws.close_code == WSCloseCode.INVALID_TEXT


async def test_a_silent_peer_that_answers_no_ping_is_dropped(
    aiohttp_client: AiohttpClient, settings: Settings, device: Device
) -> None:
    client = await aiohttp_client(create_app(replace(settings, ws_heartbeat=0.2)))
    # autoping=False: this client never answers the server's pings, like a dead device.
    async with client.ws_connect(URL, headers=device.headers, autoping=False) as ws:
        pings = 0
        while True:
            msg = await asyncio.wait_for(ws.receive(), timeout=5)
            if msg.type is not WSMsgType.PING:
                break
            pings += 1

    assert pings >= 1
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    assert client.app[INGEST].websockets == {}


async def test_a_silent_peer_that_answers_pings_is_kept(
    aiohttp_client: AiohttpClient, settings: Settings, device: Device
) -> None:
    client = await aiohttp_client(create_app(replace(settings, ws_heartbeat=0.1)))
    async with client.ws_connect(URL, headers=device.headers) as ws:
        # aiohttp's client answers pings inside receive(), so one is kept waiting.
        reply = asyncio.create_task(ws.receive_json())
        await asyncio.sleep(0.8)  # eight sweeps: ping, pong, ping, pong...
        await ws.send_json(device.batch(1))
        assert await reply == {"ack": 1}


async def test_the_server_answers_a_devices_ping(client: Client, device: Device) -> None:
    async with client.ws_connect(URL, headers=device.headers, autoping=False) as ws:
        await ws.ping(b"are you there")
        pong = await ws.receive(timeout=5)

    assert (pong.type, pong.data) == (WSMsgType.PONG, b"are you there")
