"""Hostile WebSocket traffic: each case gets a proper close code or an error reply, and the
service keeps serving the other devices' sockets meanwhile."""

import asyncio
import struct
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import pytest
from aiohttp import WSCloseCode, WSServerHandshakeError, web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from shared.keys import Keys
from shared.settings import ServiceSettings
from shared.telemetry import BATCH_FIELD, Kind
from shared.telemetry import decode_batch as decode_telemetry
from tests.support.env import AiohttpClient, Device, DeviceFactory
from tests.support.rawwire import RawSocket, exchange, frame, http_request

Client = TestClient[web.Request, web.Application]
URL = b"/ingestion/ws"

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA

# Nested far past any recursion limit, each within MAX_BODY_BYTES (64 KiB in the tests).
DEEP = [
    pytest.param(b"[" * 5000 + b"]" * 5000, id="arrays"),
    pytest.param(b'{"a":' * 5000 + b"1" + b"}" * 5000, id="objects"),
    pytest.param(b'{"seq":7,"x":' + b"[" * 5000 + b"]" * 5000 + b"}", id="under-a-seq"),
    pytest.param(b'{"x":' + b"[" * 5000 + b"]" * 5000 + b',"seq":7}', id="before-a-seq"),
    pytest.param(b"[" * 20000, id="unclosed"),
]


async def _open(client: Client, device: Device) -> RawSocket:
    return await RawSocket.open(client, URL, f"Authorization: Bearer {device.token}".encode())


@dataclass
class Bystander:
    """Another device's socket, open throughout the abuse."""

    device: Device
    socket: RawSocket

    async def is_served(self, seq: int) -> bool:
        self.socket.send(frame(TEXT, msgspec.json.encode(self.device.batch(seq))))
        return await self.socket.receive() == (TEXT, b'{"ack":%d}' % seq)


@pytest.fixture
async def other(make_device: DeviceFactory) -> Device:
    return await make_device()


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    other: Device,
    redis: Redis,
) -> Client:
    """The service with both devices registered before it started."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def bystander(client: Client, other: Device) -> AsyncIterator[Bystander]:
    async with await _open(client, other) as socket:
        yield Bystander(other, socket)


async def _reply(socket: RawSocket) -> dict[str, object]:
    opcode, payload = await socket.receive()
    assert opcode == TEXT, (opcode, payload)
    reply: dict[str, object] = msgspec.json.decode(payload)
    return reply


async def _http_error(client: Client, device: Device, body: bytes) -> tuple[int, bytes]:
    auth = f"Authorization: Bearer {device.token}".encode()
    status, headers, answer = await exchange(client, http_request(b"/ingestion/ppg", body, auth))
    assert headers["content-type"] == "application/json"
    return status, answer


@pytest.mark.parametrize("body", DEEP)
async def test_a_deeply_nested_http_body_is_a_json_refusal(
    client: Client, device: Device, body: bytes
) -> None:
    status, answer = await _http_error(client, device, body)

    assert (status, msgspec.json.decode(answer)["error"]["code"]) == (422, "invalid_field")


@pytest.mark.parametrize("message", DEEP)
async def test_a_deeply_nested_message_gets_the_http_routes_error_and_the_socket_stays(
    client: Client, device: Device, bystander: Bystander, message: bytes
) -> None:
    async with await _open(client, device) as socket:
        socket.send(frame(TEXT, message))
        error = await _reply(socket)
        socket.send(frame(TEXT, msgspec.json.encode(device.batch(1))))
        after = await _reply(socket)
    status, answer = await _http_error(client, device, message)

    assert error == {
        "error": {**msgspec.json.decode(answer)["error"], "status": status},
        "seq": None,
    }
    assert after == {"ack": 1}
    assert await bystander.is_served(1)


async def _handshake_statuses(redis: Redis, keys: Keys, pod: str) -> Counter[int]:
    entries = await redis.xrange(keys.telemetry(pod))
    return Counter(
        status
        for _, fields in entries
        for kind, route, _, status, *_ in decode_telemetry(fields[BATCH_FIELD]).records
        if kind == Kind.HTTP and route == URL.decode()
    )


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param((), id="no-upgrade"),
        pytest.param((b"Upgrade: websocket", b"Connection: Upgrade"), id="no-key"),
        pytest.param(
            (
                b"Upgrade: websocket",
                b"Connection: Upgrade",
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                b"Sec-WebSocket-Version: 99",
            ),
            id="unknown-version",
        ),
        pytest.param(
            (
                b"Upgrade: websocket",
                b"Connection: Upgrade",
                b"Sec-WebSocket-Key: not base64",
                b"Sec-WebSocket-Version: 13",
            ),
            id="bad-key",
        ),
    ],
)
async def test_a_broken_handshake_is_a_counted_400_json(
    client: Client,
    device: Device,
    settings: ServiceSettings,
    redis: Redis,
    keys: Keys,
    headers: tuple[bytes, ...],
) -> None:
    auth = f"Authorization: Bearer {device.token}".encode()
    request = b"\r\n".join([b"GET " + URL + b" HTTP/1.1", b"Host: x", auth, *headers, b"", b""])

    status, answer_headers, body = await exchange(client, request)
    async with asyncio.timeout(5):
        while (await _handshake_statuses(redis, keys, settings.pod))[400] < 1:
            await asyncio.sleep(0.02)

    assert status == 400
    assert answer_headers["content-type"] == "application/json"
    assert msgspec.json.decode(body)["error"]["code"] == "malformed"
    assert client.app[INGEST].tokens.holders == 0


async def test_a_refused_handshake_is_counted(
    client: Client, settings: ServiceSettings, redis: Redis, keys: Keys
) -> None:
    with pytest.raises(WSServerHandshakeError):
        await client.ws_connect(URL.decode(), headers={"Authorization": "Bearer pct_guess"})

    async with asyncio.timeout(5):
        while (await _handshake_statuses(redis, keys, settings.pod))[401] < 1:
            await asyncio.sleep(0.02)


async def _close_code(client: Client, device: Device, *frames: bytes) -> int:
    async with await _open(client, device) as socket:
        socket.send(*frames)
        return await socket.close_code()


async def test_a_binary_frame_closes_with_1003(
    client: Client, device: Device, bystander: Bystander
) -> None:
    code = await _close_code(client, device, frame(BINARY, b"\x00\x01"))

    assert code == WSCloseCode.UNSUPPORTED_DATA
    assert await bystander.is_served(1)


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(
    client: Client, device: Device, bystander: Bystander
) -> None:
    code = await _close_code(client, device, frame(TEXT, b'{"device_id": "\xff\xfe"}'))

    assert code == WSCloseCode.INVALID_TEXT
    assert await bystander.is_served(1)


async def test_invalid_utf8_split_across_fragments_closes_with_1007(
    client: Client, device: Device, bystander: Bystander
) -> None:
    # "\xc3" starts a two-byte character and ends the first fragment; "(" cannot follow it.
    fragments = frame(TEXT, b'{"x":"\xc3', fin=False), frame(CONTINUATION, b'("}')

    code = await _close_code(client, device, *fragments)

    assert code == WSCloseCode.INVALID_TEXT
    assert await bystander.is_served(1)


async def test_a_close_reason_that_is_not_utf8_closes_with_1007(
    client: Client, device: Device, bystander: Bystander
) -> None:
    code = await _close_code(client, device, frame(CLOSE, struct.pack("!H", 1000) + b"\xff"))

    assert code == WSCloseCode.INVALID_TEXT
    assert await bystander.is_served(1)


async def test_a_fragmented_batch_is_reassembled_and_acked(client: Client, device: Device) -> None:
    body = msgspec.json.encode(device.batch(1))
    async with await _open(client, device) as socket:
        socket.send(
            frame(TEXT, body[:10], fin=False),
            frame(PING, b"between fragments"),  # control frames may come between fragments
            frame(CONTINUATION, body[10:20], fin=False),
            frame(CONTINUATION, body[20:]),
        )
        pong = await socket.receive()
        ack = await socket.receive()

    assert pong == (PONG, b"between fragments")
    assert ack == (TEXT, b'{"ack":1}')


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([frame(CONTINUATION, b"{}")], id="continuation-without-a-start"),
        pytest.param(
            [frame(TEXT, b"{", fin=False), frame(TEXT, b"}")], id="new-message-inside-one"
        ),
        pytest.param([frame(PING, b"x", fin=False)], id="fragmented-ping"),
        pytest.param([frame(PING, b"x" * 126)], id="ping-over-125-bytes"),
        pytest.param([frame(0x3, b"{}")], id="reserved-opcode"),
        pytest.param([frame(CLOSE, struct.pack("!H", 999))], id="close-code-out-of-range"),
        pytest.param([frame(CLOSE, struct.pack("!H", 1005))], id="close-code-reserved"),
        pytest.param([frame(CLOSE, b"\x03")], id="close-payload-of-one-byte"),
        pytest.param([b"\xc1\x82\x00\x00\x00\x00{}"], id="rsv1-not-negotiated"),
    ],
)
async def test_a_protocol_violation_closes_with_1002(
    client: Client, device: Device, bystander: Bystander, frames: list[bytes]
) -> None:
    code = await _close_code(client, device, *frames)

    assert code == WSCloseCode.PROTOCOL_ERROR
    assert await bystander.is_served(1)


async def test_an_unmasked_frame_is_taken_as_aiohttp_takes_it(
    client: Client, device: Device, bystander: Bystander
) -> None:
    """RFC 6455 wants the server to close on a client frame without a mask; aiohttp does
    not check (the mask guards browsers' proxies, which devices do not go through), so it
    is answered as any message is."""
    async with await _open(client, device) as socket:
        socket.send(b"\x81\x02{}")
        reply = await _reply(socket)

    assert reply["seq"] is None
    assert isinstance(reply["error"], dict)
    assert reply["error"]["status"] == 422
    assert await bystander.is_served(1)


async def test_fragments_past_the_size_limit_close_with_1009(
    client: Client, device: Device, bystander: Bystander
) -> None:
    chunk = b" " * 16 * 1024
    first, more = frame(TEXT, chunk, fin=False), frame(CONTINUATION, chunk, fin=False)

    code = await _close_code(client, device, first, *[more] * 4)

    assert code == WSCloseCode.MESSAGE_TOO_BIG
    assert await bystander.is_served(1)


async def test_a_ping_flood_is_answered_in_order_and_others_are_served(
    client: Client, device: Device, bystander: Bystander
) -> None:
    flood = 5000
    async with await _open(client, device) as socket:
        socket.send(*(frame(PING, struct.pack("!I", i)) for i in range(flood)))
        socket.send(frame(TEXT, msgspec.json.encode(device.batch(1))))
        served = await bystander.is_served(1)
        pongs = [await socket.receive() for _ in range(flood)]
        ack = await socket.receive()

    assert served
    assert pongs == [(PONG, struct.pack("!I", i)) for i in range(flood)]
    assert ack == (TEXT, b'{"ack":1}')


async def test_a_ping_flood_from_a_peer_that_reads_nothing_is_held_back(
    client: Client, device: Device, bystander: Bystander
) -> None:
    """Once the kernel's buffers are full, pongs the peer does not read wait in the
    transport; then the peer is not read either: the flood costs the server bounded
    memory, and other sockets are served meanwhile."""
    sockets = client.app[INGEST].websockets
    async with await _open(client, device) as socket:
        # Up to 260 MB of pings, until the server stops reading them.
        held: list[asyncio.Transport] = []
        for _ in range(2000):
            socket.send(*[frame(PING, b"p" * 125)] * 1000)
            await asyncio.sleep(0.001)
            transports = [peer.transport for peer in sockets.values()]
            held = [
                t for t in transports if isinstance(t, asyncio.Transport) and not t.is_reading()
            ]
            if held:
                break
        served = await bystander.is_served(1)
        buffered = [t.get_write_buffer_size() for t in held]

    assert served
    assert len(buffered) == 1
    assert buffered[0] < 1 << 20
