"""The HTTP ingestion contract: every status of the public API, and what gets stored."""

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from unittest import mock

import msgspec
import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from multidict import CIMultiDict
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from service.fastpath.acks import AckResponse
from shared.devices import revoke_device
from shared.keys import Keys
from shared.settings import ServiceSettings
from tests.support.env import AiohttpClient, Device, DeviceFactory
from tests.support.readings import stored_batches

Client = TestClient[web.Request, web.Application]
URL = "/ingestion/ppg"


async def test_valid_batch_is_accepted_and_stored(
    client: Client, device: Device, redis: Redis, keys: Keys
) -> None:
    response = await client.post(URL, json=device.batch(7), headers=device.headers)

    assert response.status == 202
    assert await response.json() == {"accepted": 4, "seq": 7, "duplicate": False}
    assert await stored_batches(redis, keys) == [device.batch(7)]


async def test_retried_batch_is_acknowledged_and_stored_once(
    client: Client, device: Device, redis: Redis, keys: Keys
) -> None:
    first = await client.post(URL, json=device.batch(1), headers=device.headers)
    retry = await client.post(URL, json=device.batch(1), headers=device.headers)

    assert first.status == retry.status == 202
    assert (await retry.json())["duplicate"] is True
    assert len(await stored_batches(redis, keys)) == 1


async def test_concurrent_requests_share_redis_round_trips(
    client: Client, device: Device, redis: Redis, keys: Keys
) -> None:
    responses = await asyncio.gather(
        *(client.post(URL, json=device.batch(seq), headers=device.headers) for seq in range(200))
    )

    assert [r.status for r in responses] == [202] * 200
    assert len(await stored_batches(redis, keys)) == 200
    assert client.app[INGEST].writer.batches < 200


async def test_missing_token_is_401(client: Client, device: Device) -> None:
    response = await client.post(URL, json=device.batch(1))

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_unknown_token_is_401(client: Client, device: Device) -> None:
    headers = {**device.headers, "Authorization": "Bearer pct_not-a-real-token"}
    response = await client.post(URL, json=device.batch(1), headers=headers)

    assert response.status == 401


async def test_non_bearer_scheme_is_401(client: Client, device: Device) -> None:
    headers = {**device.headers, "Authorization": f"Basic {device.token}"}
    response = await client.post(URL, json=device.batch(1), headers=headers)

    assert response.status == 401


async def test_token_of_another_device_is_403(client: Client, device: Device) -> None:
    response = await client.post(
        URL, json=device.batch(1, device_id="someone-else"), headers=device.headers
    )

    assert response.status == 403
    assert (await response.json())["error"]["details"] == {"field": "device_id"}


async def test_malformed_json_is_400(client: Client, device: Device) -> None:
    response = await client.post(URL, data=b'{"device_id": ', headers=device.headers)

    assert response.status == 400
    assert (await response.json())["error"]["code"] == "malformed"


async def test_wrong_content_type_is_415(client: Client, device: Device) -> None:
    headers = {**device.headers, "Content-Type": "text/plain"}
    response = await client.post(URL, data=b"{}", headers=headers)

    assert response.status == 415


async def test_body_over_the_limit_is_413(client: Client, device: Device) -> None:
    body = msgspec.json.encode(device.batch(1, ppg=[0.1234567890123456] * 4000))
    assert len(body) > 64 * 1024

    response = await client.post(URL, data=body, headers=device.headers)

    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"


async def test_chunked_body_over_the_limit_is_413(client: Client, device: Device) -> None:
    async def chunks() -> object:
        for _ in range(100):
            yield b" " * 1024

    response = await client.post(URL, data=chunks(), headers=device.headers)

    assert response.status == 413


async def test_invalid_fields_are_422_naming_the_field(client: Client, device: Device) -> None:
    cases = {
        "seq": {**device.batch(1), "seq": -1},
        "ts": device.batch(1, ts="yesterday"),
        "rate_hz": device.batch(1, rate_hz=0),
        "ppg": device.batch(1, ppg=[]),
        "ppg[1]": device.batch(1, ppg=[1.0, "x"]),
        "hr": device.batch(1, hr=True),
        "spo2": device.batch(1, spo2=101),
        "device_id": device.batch(1, device_id=""),
        "extra": {**device.batch(1), "extra": 1},
        "$": [device.batch(1)],
    }
    for field, body in cases.items():
        response = await client.post(URL, json=body, headers=device.headers)
        error = (await response.json())["error"]
        assert (response.status, error["details"]) == (422, {"field": field}), field


async def test_missing_field_is_422(client: Client, device: Device) -> None:
    body = device.batch(1)
    del body["ppg"]

    response = await client.post(URL, json=body, headers=device.headers)

    assert response.status == 422
    assert (await response.json())["error"]["details"] == {"field": "ppg"}


async def test_infinite_sample_is_422(client: Client, device: Device) -> None:
    body = msgspec.json.encode(device.batch(1)).replace(b"[0.5,", b"[1e999,")

    response = await client.post(URL, data=body, headers=device.headers)

    assert response.status == 422


async def test_backlog_over_the_limit_is_503_with_retry_after(
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    redis: Redis,
    keys: Keys,
) -> None:
    client = await aiohttp_client(create_app(replace(settings, readings_max_backlog=3)))
    for seq in range(4):
        assert (
            await client.post(URL, json=device.batch(seq), headers=device.headers)
        ).status == 202
    await asyncio.sleep(0.3)  # several backlog polls in the test settings

    response = await client.post(URL, json=device.batch(99), headers=device.headers)

    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert "backlog" in (await response.json())["error"]["message"]
    assert len(await stored_batches(redis, keys)) == 4


async def test_revoked_token_is_refused_after_the_refresh(
    client: Client, device: Device, migrated: str
) -> None:
    assert (await client.post(URL, json=device.batch(1), headers=device.headers)).status == 202
    async with await psycopg.AsyncConnection.connect(migrated) as conn:
        await revoke_device(conn, device.device_id)
    await asyncio.sleep(0.5)  # five refresh intervals in the test settings

    response = await client.post(URL, json=device.batch(2), headers=device.headers)

    assert response.status == 401


async def test_device_added_while_running_is_accepted_after_the_refresh(
    client: Client, make_device: DeviceFactory
) -> None:
    newcomer = await make_device()
    await asyncio.sleep(0.5)

    response = await client.post(URL, json=newcomer.batch(1), headers=newcomer.headers)

    assert response.status == 202


async def test_unknown_route_and_method_answer_json(client: Client) -> None:
    missing = await client.get("/nope")
    wrong_method = await client.put(URL)

    assert (missing.status, (await missing.json())["error"]["code"]) == (404, "not_found")
    assert wrong_method.status == 405
    assert "POST" in wrong_method.headers["Allow"]


async def test_writes_continue_after_redis_forgets_the_script(
    client: Client, device: Device, redis: Redis, keys: Keys
) -> None:
    assert (await client.post(URL, json=device.batch(1), headers=device.headers)).status == 202
    await redis.script_flush()

    response = await client.post(URL, json=device.batch(2), headers=device.headers)

    assert response.status == 202
    assert len(await stored_batches(redis, keys)) == 2


async def test_idempotency_covers_the_last_window_of_seqs_per_device(
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    redis: Redis,
    keys: Keys,
) -> None:
    ttl = 120
    client = await aiohttp_client(
        create_app(replace(settings, idempotency_window=8, idempotency_ttl=ttl))
    )
    for seq in range(1, 11):
        await client.post(URL, json=device.batch(seq), headers=device.headers)

    last = await client.post(URL, json=device.batch(10), headers=device.headers)
    oldest_in_window = await client.post(URL, json=device.batch(3), headers=device.headers)
    forgotten = await client.post(URL, json=device.batch(2), headers=device.headers)

    # The window is the 8 seqs up to the highest stored (3..10); 2 is older: stored again.
    assert (await last.json())["duplicate"] is True
    assert (await oldest_in_window.json())["duplicate"] is True
    assert (await forgotten.json())["duplicate"] is False
    assert [b["seq"] for b in await stored_batches(redis, keys)] == [*range(1, 11), 2]
    # The device's state is one record in a hash per generation (as long as the TTL, or the
    # longest ingest rate-limit window: shorter here), which expires at the end of the next.
    assert settings.rate_limit_ingest_ttl <= ttl
    assert settings.rate_limit_ingest_burst_ttl <= ttl
    generation_ms = ttl * 1000
    hashes = [key async for key in redis.scan_iter(match=f"{keys.ingest_state_prefix}*")]
    assert hashes
    assert any([await redis.hexists(key, device.device_id) for key in hashes])
    for key in hashes:
        assert generation_ms < await redis.pttl(key) <= 2 * generation_ms


# The 202 is written from bytes (service/fastpath/acks.py), not by aiohttp's Response: these pin its
# wire form against what HTTP clients rely on.


def test_the_stream_response_internals_the_ack_writes_through_are_still_there() -> None:
    """service/fastpath/acks.py sets and reads these; an aiohttp upgrade renaming them trips."""
    response = web.StreamResponse()
    assert getattr(response, "_eof_sent") is False  # noqa: B009 -- a private name, on purpose
    assert getattr(response, "_keep_alive") is None  # noqa: B009 -- a private name, on purpose
    assert isinstance(getattr(response, "_headers"), CIMultiDict)  # noqa: B009 -- as above
    response.headers["X-Probe"] = "1"
    assert getattr(response, "_headers")["X-Probe"] == "1"  # noqa: B009 -- as above


async def _exchange(
    client: Client, device: Device, seq: int, *, version: str = "1.1", connection: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes, dict[str, str], bytes]:
    """Send one request on a raw socket: (reader, writer, status line, headers, body)."""
    assert client.server.host is not None
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    return (reader, writer, *await _roundtrip(reader, writer, device, seq, version, connection))


async def _roundtrip(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    device: Device,
    seq: int,
    version: str,
    connection: str,
) -> tuple[bytes, dict[str, str], bytes]:
    body = msgspec.json.encode(device.batch(seq))
    head = [
        f"POST {URL} HTTP/{version}",
        "Host: localhost",
        f"Authorization: Bearer {device.token}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if connection:
        head.append(f"Connection: {connection}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    status = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        assert name.lower() not in headers, f"header {name} sent twice"
        headers[name.lower()] = value.strip()
    return status, headers, await reader.readexactly(int(headers["content-length"]))


async def test_ack_on_the_wire_is_well_formed_and_keeps_the_connection(
    client: Client, device: Device
) -> None:
    reader, writer, status, headers, body = await _exchange(client, device, 1)
    try:
        assert status == b"HTTP/1.1 202 Accepted\r\n"
        assert headers["content-type"] == "application/json"
        assert msgspec.json.decode(body) == {"accepted": 4, "seq": 1, "duplicate": False}
        assert "connection" not in headers  # HTTP/1.1 keeps the connection by default
        sent = parsedate_to_datetime(headers["date"])
        assert abs((sent - datetime.now(UTC)).total_seconds()) < 5
        # The same connection takes the next request.
        status, _, body = await _roundtrip(reader, writer, device, 2, "1.1", "")
        assert status.startswith(b"HTTP/1.1 202")
        assert msgspec.json.decode(body)["seq"] == 2
    finally:
        writer.close()


async def test_ack_honours_connection_close(client: Client, device: Device) -> None:
    reader, writer, status, headers, _ = await _exchange(client, device, 1, connection="close")
    try:
        assert status.startswith(b"HTTP/1.1 202")
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
    finally:
        writer.close()


async def test_ack_to_http_10_clients(client: Client, device: Device) -> None:
    reader, writer, status, headers, _ = await _exchange(client, device, 1, version="1.0")
    try:
        assert status == b"HTTP/1.0 202 Accepted\r\n"
        assert "connection" not in headers  # HTTP/1.0 closes by default
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()

    reader, writer, status, headers, _ = await _exchange(
        client, device, 2, version="1.0", connection="keep-alive"
    )
    try:
        assert headers["connection"] == "keep-alive"
        status, _, _ = await _roundtrip(reader, writer, device, 3, "1.0", "keep-alive")
        assert status.startswith(b"HTTP/1.0 202")
    finally:
        writer.close()


async def _written_ack(headers: dict[str, str]) -> bytes:
    """What an ack with ``headers`` set on it writes to its connection."""
    transport = mock.Mock()
    transport.is_closing.return_value = False
    response = AckResponse(b"{}")
    response.headers.update(headers)
    await response.prepare(make_mocked_request("POST", "/ingestion/ppg", transport=transport))
    [(written,), _] = transport.write.call_args
    return bytes(written)


async def test_ack_refuses_header_values_that_would_split_the_response() -> None:
    head, _, body = (await _written_ack({"traceresponse": "00-abc-def-01"})).partition(b"\r\n\r\n")
    assert head.endswith(b"\r\ntraceresponse: 00-abc-def-01")
    assert body == b"{}"
    with pytest.raises(ValueError, match="line break"):
        await _written_ack({"X-Note": "a\r\nSet-Cookie: b"})
