"""The WebSocket ingestion contract: acks, errors that keep the connection, protocol abuse."""

import asyncio
import base64
from dataclasses import replace
from unittest import mock

import pytest
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import TestClient, make_mocked_request
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from service.fastpath import wsframes
from service.fastpath.wsframes import TextSocket
from service.ingest import ws as ws_route
from shared.keys import Keys
from shared.settings import ServiceSettings
from tests.support.env import AiohttpClient, Device
from tests.support.readings import stored_batches

Client = TestClient[web.Request, web.Application]
URL = "/ingestion/ws"


async def test_each_batch_is_acked_and_stored(
    client: Client, device: Device, redis: Redis, keys: Keys
) -> None:
    async with client.ws_connect(URL, headers=device.headers) as ws:
        for seq in (1, 2, 3):
            await ws.send_json(device.batch(seq))
            assert await ws.receive_json() == {"ack": seq}

    assert [b["seq"] for b in await stored_batches(redis, keys)] == [1, 2, 3]


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
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device
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
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device
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


async def test_text_messages_are_taken_from_the_frame_parser(
    client: Client, device: Device
) -> None:
    """On the aiohttp this project pins, the ingest socket takes text frames as they are
    parsed (service/fastpath/wsframes.py); an aiohttp upgrade that changes its internals fails here
    instead of quietly costing more per message."""
    async with client.ws_connect(URL, headers=device.headers) as ws:
        await ws.send_json(device.batch(1))
        assert await ws.receive_json() == {"ack": 1}
        [server_socket] = client.app[INGEST].websockets

    assert isinstance(server_socket, TextSocket)
    assert server_socket.taking_text


async def test_messages_sent_without_waiting_are_answered_in_order(
    client: Client, device: Device, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading pauses at 4 unanswered messages and resumes at 2: the 200 below go through it.
    monkeypatch.setattr(ws_route, "MAX_UNANSWERED", 4)
    pauses = []
    pause = ws_route.DeviceSocket.pause

    def counted_pause(socket: ws_route.DeviceSocket) -> None:
        pauses.append(len(socket.unanswered))
        pause(socket)

    monkeypatch.setattr(ws_route.DeviceSocket, "pause", counted_pause)
    seqs = list(range(1, 201))
    async with client.ws_connect(URL, headers=device.headers) as ws:
        for seq in seqs:
            await ws.send_json(device.batch(seq))
        await ws.send_str("{not json")  # answered after every ack before it
        await ws.send_json(device.batch(200))  # a retry (of a seq the idempotency set holds)
        replies = [await ws.receive_json() for _ in range(len(seqs) + 2)]

    assert pauses
    assert all(unanswered >= 4 for unanswered in pauses)
    assert replies[: len(seqs)] == [{"ack": seq} for seq in seqs]
    assert replies[-2]["error"]["status"] == 400
    assert replies[-1] == {"ack": 200, "duplicate": True}
    assert [b["seq"] for b in await stored_batches(redis, keys)] == seqs
    assert client.app[INGEST].batches_in_flight == 0


async def test_a_device_that_does_not_read_its_answers_is_not_read_either(
    client: Client, device: Device
) -> None:
    async with client.ws_connect(URL, headers=device.headers) as ws:
        await ws.send_json(device.batch(1))
        assert await ws.receive_json() == {"ack": 1}
        [server_socket] = client.app[INGEST].websockets
        assert server_socket._req is not None
        protocol = server_socket._req.protocol
        protocol.pause_writing()  # what the transport does when its buffer is full

        await ws.send_json(device.batch(2))
        assert await ws.receive_json() == {"ack": 2}  # taken, answered, and reading paused
        await ws.send_json(device.batch(3))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.receive(), timeout=0.3)
        protocol.resume_writing()  # the device read what was waiting
        assert await ws.receive_json(timeout=5) == {"ack": 3}


async def test_the_ordinary_aiohttp_path_keeps_the_same_contract(
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where aiohttp's internals are not as expected, text messages come through its queue
    and the handler's loop, and are answered the same way."""
    monkeypatch.setattr(wsframes, "PARSER_INTERNALS", False)
    client = await aiohttp_client(create_app(settings))
    async with client.ws_connect(URL, headers=device.headers) as ws:
        await ws.send_json(device.batch(1))
        await ws.send_json(device.batch(2))
        await ws.send_str("{not json")
        await ws.send_json(device.batch(1))
        replies = [await ws.receive_json() for _ in range(4)]
        [server_socket] = client.app[INGEST].websockets
        await ws.send_bytes(b"\x00junk")
        closing = await ws.receive()

    assert isinstance(server_socket, TextSocket)
    assert not server_socket.taking_text
    assert replies[:2] == [{"ack": 1}, {"ack": 2}]
    assert replies[2]["error"]["status"] == 400
    assert replies[3] == {"ack": 1, "duplicate": True}
    assert closing.type is WSMsgType.CLOSE
    assert ws.close_code == WSCloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
async def test_a_reply_frame_is_fin_text_unmasked_with_its_length(size: int, header: bytes) -> None:
    """RFC 6455 5.2: 7-bit length, else 126 and 16 bits, else 127 and 64 bits."""
    transport = mock.Mock()
    transport.is_closing.return_value = False
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
        "Sec-WebSocket-Version": "13",
    }
    socket = TextSocket(lambda text: None)
    await socket.prepare(make_mocked_request("GET", URL, headers=handshake, transport=transport))
    payload = "x" * size

    assert socket.send_text_frame(payload)
    [(written,), _] = transport.write.call_args
    assert written == header + payload.encode()
