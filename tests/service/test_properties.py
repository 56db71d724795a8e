"""Property tests: no body and no WebSocket message, however strange, gets a 500 or a crash."""

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from aiohttp import ClientWebSocketResponse, web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from service.app import create_app
from shared.devices import add_device
from shared.settings import ServiceSettings
from tests.support.env import REDIS_URL, Device

REFUSALS = {400, 403, 413, 422}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = ("device_id", "seq", "ts", "rate_hz", "ppg", "hr", "spo2")


class Harness:
    """A running service driven from synchronous hypothesis examples through one loop."""

    def __init__(
        self,
        runner: asyncio.Runner,
        client: TestClient[web.Request, web.Application],
        device: Device,
        ws: ClientWebSocketResponse,
    ) -> None:
        self.runner = runner
        self.client = client
        self.device = device
        self.ws = ws
        self.seq = 0

    def post(self, body: bytes) -> tuple[int, Any]:
        async def go() -> tuple[int, Any]:
            response = await self.client.post(
                "/ingestion/ppg", data=body, headers=self.device.headers
            )
            return response.status, await response.json()

        return self.runner.run(go())

    def send(self, message: str) -> Any:
        async def go() -> Any:
            await self.ws.send_str(message)
            return await self.ws.receive_json(timeout=5)

        return self.runner.run(go())

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


@pytest.fixture(scope="module")
def harness(migrated: str) -> Iterator[Harness]:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    config = ServiceSettings(
        redis_url=REDIS_URL,
        redis_key_prefix=prefix,
        database_url=migrated,
        pod_name="prop",
        max_body_bytes=16 * 1024,
    )
    with asyncio.Runner() as runner:

        async def start() -> Harness:
            device_id = f"prop-{uuid.uuid4().hex[:8]}"
            async with await psycopg.AsyncConnection.connect(migrated) as conn:
                token = await add_device(conn, device_id)
            device = Device(device_id, token)
            client = TestClient(TestServer(create_app(config)))
            await client.start_server()
            ws = await client.ws_connect("/ingestion/ws", headers=device.headers)
            return Harness(runner, client, device, ws)

        harness = runner.run(start())
        yield harness

        async def stop() -> None:
            await harness.ws.close()
            await harness.client.close()
            redis = Redis.from_url(REDIS_URL)
            keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()

        runner.run(stop())


def _near_valid(harness: Harness, field: str, value: Any) -> bytes:
    body: dict[str, Any] = harness.device.batch(harness.next_seq())
    body[field] = value
    return json.dumps(body, allow_nan=True).encode()


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_cleanly(harness: Harness, body: bytes) -> None:
    status, reply = harness.post(body)

    assert status in REFUSALS
    assert set(reply["error"]) == {"code", "message", "details"}


@SETTINGS
@given(value=json_values)
def test_arbitrary_json_documents_are_refused_cleanly(harness: Harness, value: Any) -> None:
    status, reply = harness.post(json.dumps(value, allow_nan=True).encode())

    assert status in REFUSALS
    assert "error" in reply


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_batches_with_one_arbitrary_field_never_fail_badly(
    harness: Harness, field: str, value: Any
) -> None:
    status, reply = harness.post(_near_valid(harness, field, value))

    assert status in REFUSALS | {202}
    assert ("accepted" in reply) == (status == 202)


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_websocket_messages_with_one_arbitrary_field_never_drop_the_connection(
    harness: Harness, field: str, value: Any
) -> None:
    reply = harness.send(_near_valid(harness, field, value).decode())

    assert ("ack" in reply) != ("error" in reply)
    if "error" in reply:
        assert reply["error"]["status"] in REFUSALS
    assert not harness.ws.closed


@SETTINGS
@given(message=st.text(max_size=200))
def test_arbitrary_websocket_text_gets_an_error_message(harness: Harness, message: str) -> None:
    reply = harness.send(message)

    assert reply["error"]["status"] in REFUSALS
    assert not harness.ws.closed
