"""A revoked or rotated device token ends the WebSockets already open with it: within one
refresh interval plus one query, with 1008, after answering what they had taken, with no
ack after the revocation; other devices' sockets stay."""

import asyncio
import contextlib
from dataclasses import replace

import msgspec
import psycopg
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType, web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from service.fastpath import wsframes
from service.fastpath.wsframes import TextSocket
from service.tokens import REPLACED, REVOKED, next_refresh_in
from shared.devices import TokenChange, add_device, load_token_changes, revoke_device
from shared.keys import Keys
from shared.settings import ServiceSettings
from tests.support.env import AiohttpClient, Device, DeviceFactory
from tests.support.readings import stored_batches

Client = TestClient[web.Request, web.Application]
URL = "/ingestion/ws"
# docs/revocation.md's promise, which the test settings' refresh interval (0.1 s) keeps with room.
BOUND = 5.0


async def _stored_seqs(redis: Redis, keys: Keys) -> list[int]:
    return [batch["seq"] for batch in await stored_batches(redis, keys)]


async def _send_until_closed(
    ws: ClientWebSocketResponse, device: Device, first_seq: int
) -> tuple[list[dict[str, object]], int | None, str]:
    """Send a batch every 20 ms while reading the answers, until the server closes:
    (answers in order, close code, close reason)."""

    async def send() -> None:
        seq = first_seq
        with contextlib.suppress(ConnectionError):
            while not ws.closed:
                await ws.send_json(device.batch(seq))
                seq += 1
                await asyncio.sleep(0.02)

    sender = asyncio.create_task(send())
    answers: list[dict[str, object]] = []
    try:
        while True:
            message = await ws.receive()
            if message.type is not WSMsgType.TEXT:
                break
            answers.append(msgspec.json.decode(message.data))
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    assert message.type is WSMsgType.CLOSE, message
    return answers, ws.close_code, message.extra or ""


def _no_ack_after_a_refusal(answers: list[dict[str, object]]) -> bool:
    statuses = [401 if "error" in a else 202 for a in answers]
    return statuses == sorted(statuses)


@pytest.mark.parametrize("taking_text", [True, False], ids=["fast-path", "aiohttp-path"])
async def test_a_revoked_token_closes_its_open_socket_with_1008(
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    migrated: str,
    redis: Redis,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    taking_text: bool,
) -> None:
    monkeypatch.setattr(wsframes, "PARSER_INTERNALS", taking_text)
    client = await aiohttp_client(create_app(settings))
    async with client.ws_connect(URL, headers=device.headers) as ws:
        await ws.send_json(device.batch(1))
        assert await ws.receive_json() == {"ack": 1}
        [server_socket] = client.app[INGEST].websockets
        assert isinstance(server_socket, TextSocket)
        assert server_socket.taking_text is taking_text
        async with await psycopg.AsyncConnection.connect(migrated) as conn:
            await revoke_device(conn, device.device_id)
        async with asyncio.timeout(BOUND):
            answers, code, reason = await _send_until_closed(ws, device, 2)
    refused = await client.post("/ingestion/ppg", json=device.batch(1000), headers=device.headers)

    assert (code, reason) == (1008, REVOKED)
    assert _no_ack_after_a_refusal(answers)
    refusals = [a for a in answers if "error" in a]
    assert all(r["error"]["status"] == 401 for r in refusals)  # type: ignore[index]
    acked = [1] + [a["ack"] for a in answers if "ack" in a]
    assert await _stored_seqs(redis, keys) == acked
    assert refused.status == 401
    assert client.app[INGEST].tokens.holders == 0


async def test_a_rotated_token_closes_the_sockets_opened_with_the_old_one(
    client: Client, device: Device, migrated: str
) -> None:
    async with client.ws_connect(URL, headers=device.headers) as old:
        await old.send_json(device.batch(1))
        assert await old.receive_json() == {"ack": 1}
        async with await psycopg.AsyncConnection.connect(migrated) as conn:
            token = await add_device(conn, device.device_id, rotate=True)
        async with asyncio.timeout(BOUND):
            answers, code, reason = await _send_until_closed(old, device, 2)
    rotated = Device(device.device_id, token)
    async with client.ws_connect(URL, headers=rotated.headers) as new:
        await new.send_json(rotated.batch(500))
        after = await new.receive_json()

    assert (code, reason) == (1008, REPLACED)
    assert _no_ack_after_a_refusal(answers)
    assert after == {"ack": 500}


async def test_another_devices_socket_stays_open(
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    make_device: DeviceFactory,
    migrated: str,
) -> None:
    other = await make_device()
    client = await aiohttp_client(create_app(settings))
    async with (
        client.ws_connect(URL, headers=device.headers) as revoked,
        client.ws_connect(URL, headers=other.headers) as kept,
    ):
        await revoked.send_json(device.batch(1))
        await kept.send_json(other.batch(1))
        assert (await revoked.receive_json(), await kept.receive_json()) == ({"ack": 1},) * 2
        async with await psycopg.AsyncConnection.connect(migrated) as conn:
            await revoke_device(conn, device.device_id)
        async with asyncio.timeout(BOUND):
            _, code, _ = await _send_until_closed(revoked, device, 2)
        await asyncio.sleep(1.0)  # ten more refreshes in the test settings
        await kept.send_json(other.batch(2))
        after = await kept.receive_json()
        holders = client.app[INGEST].tokens.holders

    assert code == 1008
    assert after == {"ack": 2}
    assert holders == 1


async def test_messages_taken_before_the_revocation_are_acked_and_none_after(
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    migrated: str,
    redis: Redis,
    keys: Keys,
) -> None:
    """The change is applied to the cache here, as its refresher applies it, at a chosen
    moment: while the socket's first messages wait for their write."""
    client = await aiohttp_client(create_app(replace(settings, token_refresh_interval=3600)))
    state = client.app[INGEST]
    async with (
        asyncio.timeout(BOUND),
        await psycopg.AsyncConnection.connect(migrated) as conn,
        client.ws_connect(URL, headers=device.headers) as ws,
    ):
        await revoke_device(conn, device.device_id)
        changes = await load_token_changes(conn, None)
        for seq in range(1, 6):
            await ws.send_json(device.batch(seq))
        while state.batches_in_flight == 0:  # taken, their writes not answered yet
            await asyncio.sleep(0)
        state.tokens.apply(changes, full=True)
        for seq in range(6, 11):
            await ws.send_json(device.batch(seq))
        answers, code, reason = await _send_until_closed(ws, device, 11)

    acked = [a["ack"] for a in answers if "ack" in a]
    assert (code, reason) == (1008, REVOKED)
    assert acked
    assert acked == list(range(1, len(acked) + 1))
    assert _no_ack_after_a_refusal(answers)
    assert await _stored_seqs(redis, keys) == acked


async def test_a_token_revoked_during_the_handshake_closes_the_new_socket(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device, migrated: str
) -> None:
    """Authenticated, then revoked while the 101 is written: the socket opens and closes."""
    app = create_app(replace(settings, token_refresh_interval=3600))
    revocation: list[TokenChange] = []

    async def revoke_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if isinstance(response, web.WebSocketResponse):
            request.app[INGEST].tokens.apply(revocation, full=True)

    app.on_response_prepare.append(revoke_on_prepare)
    client = await aiohttp_client(app)
    async with await psycopg.AsyncConnection.connect(migrated) as conn:
        await revoke_device(conn, device.device_id)
        revocation.extend(await load_token_changes(conn, None))
    async with asyncio.timeout(BOUND), client.ws_connect(URL, headers=device.headers) as ws:
        closing = await ws.receive()

    assert (closing.type, ws.close_code, closing.extra) == (WSMsgType.CLOSE, 1008, REVOKED)
    assert client.app[INGEST].tokens.holders == 0


def test_refreshes_start_one_interval_apart_however_long_each_takes() -> None:
    """The bound's arithmetic: a change committed at t is read by the first refresh that
    starts after t, which starts at most one interval later, and is applied (its sockets
    told) when that refresh's query returns."""
    assert next_refresh_in(100.0, 100.3, 5.0) == pytest.approx(4.7)
    assert next_refresh_in(100.0, 100.0, 5.0) == 5.0
    assert next_refresh_in(100.0, 107.5, 5.0) == 0.0


def test_the_default_interval_keeps_the_documented_bound() -> None:
    """docs/revocation.md and docs/ingestion.md: within 5 s plus one query, with the defaults."""
    assert ServiceSettings().token_refresh_interval <= BOUND
