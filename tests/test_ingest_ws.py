"""The WebSocket ingestion contract: acks, errors that keep the connection, protocol abuse."""

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from shared.keys import Keys

from .conftest import Device

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
