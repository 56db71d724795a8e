"""Read deadlines (HTTP_HEADER_TIMEOUT, HTTP_BODY_TIMEOUT, HTTP_KEEPALIVE_TIMEOUT): a slow or
silent client holds a connection no longer than they allow, and WebSockets are not theirs.

The service runs as ``pulsecal-service`` runs it (``service.server.running``) with deadlines
of a fraction of a second, spoken to over raw sockets.
"""

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import cast

import pytest
from aiohttp import ClientSession, WSMsgType
from redis.asyncio import Redis

from service.server import Running, running
from shared.httpserver import SERVER
from shared.keys import Keys
from shared.settings import ServiceSettings
from shared.telemetry import BATCH_FIELD, Kind, decode_batch
from tests.support.env import Device
from tests.support.rawhttp import converse

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
KEEPALIVE_TIMEOUT = 1.0
# The service starts a deadline when it has accepted the connection, a moment before the
# client starts its own clock: a lower bound a hair short of the deadline.
EARLY = 0.05
# redis-py types stream entries as Optional throughout; without decode_responses they are:
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


@pytest.fixture
async def service(settings: ServiceSettings, device: Device) -> AsyncIterator[Running]:
    short = dataclasses.replace(
        settings,
        http_header_timeout=HEADER_TIMEOUT,
        http_body_timeout=BODY_TIMEOUT,
        http_keepalive_timeout=KEEPALIVE_TIMEOUT,
        rate_limit_enabled=False,
    )
    async with running(short, host="127.0.0.1") as service:
        yield service


async def protocol_errors(redis: Redis, keys: Keys, pod: str, kind: str, count: int) -> int:
    """The PROTOCOL_ERROR records of ``kind`` in the pod's telemetry, once there are
    ``count`` (or after 5 s)."""
    found = 0
    async with asyncio.timeout(5):
        while found < count:
            await asyncio.sleep(0.05)
            entries = cast(StreamEntries, await redis.xrange(keys.telemetry(pod)))
            found = sum(
                1
                for _, fields in entries
                for record in decode_batch(fields[BATCH_FIELD]).records
                if record[0] == Kind.PROTOCOL_ERROR and record[1] == kind
            )
    return found


def ingest_head(device: Device, length: int) -> bytes:
    return (
        b"POST /ingestion/ppg HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (device.token.encode(), length)
    )


async def test_a_head_that_stops_half_way_is_answered_408_and_closed(
    service: Running, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    answer = await converse(service.port, [b"GET /health HTTP/1.1\r\nHost: x\r\n"])

    assert answer.status == 408
    assert answer.headers["connection"] == "close"
    assert answer.headers["server"] == SERVER
    assert answer.json()["error"]["details"] == {"kind": "header_timeout"}
    assert answer.closed_after >= HEADER_TIMEOUT - EARLY
    assert await protocol_errors(redis, keys, settings.pod, "header_timeout", 1) == 1


async def test_a_head_sent_a_byte_at_a_time_gets_no_more_than_the_header_timeout(
    service: Running,
) -> None:
    head = b"GET /health/liveness HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    trickle: list[bytes | float] = []
    for byte in head:
        trickle += [bytes([byte]), HEADER_TIMEOUT / 4]

    answer = await converse(service.port, trickle)

    # Each byte came well within the timeout of the one before: the head as a whole did not.
    assert answer.status == 408
    assert HEADER_TIMEOUT - EARLY <= answer.closed_after < len(head) * HEADER_TIMEOUT / 4


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    service: Running,
) -> None:
    answer = await converse(service.port, [])

    assert answer.status is None
    assert answer.closed_after >= HEADER_TIMEOUT - EARLY


async def test_a_body_that_stops_half_way_is_refused_408_and_its_connection_closed(
    service: Running, device: Device, redis: Redis, keys: Keys, settings: ServiceSettings
) -> None:
    body = json.dumps(device.batch(1)).encode()

    answer = await converse(service.port, [ingest_head(device, len(body)) + body[:20]])

    assert answer.status == 408, answer.raw
    assert answer.json()["error"]["code"] == "request_timeout"
    assert answer.closed_after >= BODY_TIMEOUT - EARLY
    assert await protocol_errors(redis, keys, settings.pod, "body_timeout", 1) == 1


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    service: Running,
) -> None:
    request = b"GET /health/liveness HTTP/1.1\r\nHost: x\r\n\r\n"

    # Within the timeout of each other both are answered on the one connection.
    answer = await converse(service.port, [request, KEEPALIVE_TIMEOUT / 2, request])

    assert answer.raw.count(b"HTTP/1.1 200 OK") == 2
    assert answer.closed_after >= KEEPALIVE_TIMEOUT * 1.5 - EARLY


async def test_a_websocket_outlives_every_http_deadline(service: Running, device: Device) -> None:
    url = f"http://127.0.0.1:{service.port}/ingestion/ws"
    headers = {"Authorization": f"Bearer {device.token}"}
    async with ClientSession() as session, session.ws_connect(url, headers=headers) as ws:
        await asyncio.sleep(KEEPALIVE_TIMEOUT + HEADER_TIMEOUT + BODY_TIMEOUT)
        await ws.send_json(device.batch(5))
        answer = await ws.receive(timeout=5)

    assert answer.type is WSMsgType.TEXT
    assert json.loads(answer.data) == {"ack": 5}
