"""Any bytes in ``Authorization`` are a failed authentication: 401 JSON, counted against the
client's IP like any wrong token, on the HTTP route and the WebSocket handshake alike."""

from dataclasses import replace

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from shared.settings import ServiceSettings
from tests.support.env import AiohttpClient, Device
from tests.support.rawwire import exchange, http_request, ws_handshake

Client = TestClient[web.Request, web.Application]

# Bytes a header decoded as UTF-8 cannot hold: aiohttp keeps them as lone surrogates.
NOT_UTF8 = [b"Bearer \xff\xfe", b"Bearer pct_\x80abc", b"\xc3(", b"Bearer \xed\xa0\x80"]


def _http(authorization: bytes, device: Device) -> bytes:
    body = msgspec.json.encode(device.batch(1))
    return http_request(b"/ingestion/ppg", body, b"Authorization: " + authorization)


def _handshake(authorization: bytes) -> bytes:
    return ws_handshake(b"/ingestion/ws", b"Authorization: " + authorization)


@pytest.mark.parametrize("authorization", NOT_UTF8)
async def test_a_non_utf8_token_on_the_http_route_is_401_json(
    client: Client, device: Device, authorization: bytes
) -> None:
    status, headers, body = await exchange(client, _http(authorization, device))

    assert status == 401
    assert headers["content-type"] == "application/json"
    assert msgspec.json.decode(body)["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("authorization", NOT_UTF8)
async def test_a_non_utf8_token_on_the_websocket_handshake_is_401_json(
    client: Client, authorization: bytes
) -> None:
    status, headers, body = await exchange(client, _handshake(authorization))

    assert status == 401
    assert headers["content-type"] == "application/json"
    assert msgspec.json.decode(body)["error"]["code"] == "unauthorized"


async def test_non_utf8_tokens_spend_the_ip_budget_like_any_wrong_token(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device
) -> None:
    limited = replace(settings, rate_limit_max=3, rate_limit_ttl=60, rate_limit_burst_max=0)
    client = await aiohttp_client(create_app(limited))
    statuses = []
    for i in range(4):
        request = (
            _http(b"Bearer \xff%d" % i, device) if i % 2 == 0 else _handshake(b"Bearer \xfe%d" % i)
        )
        statuses.append((await exchange(client, request))[0])

    assert statuses == [401, 401, 401, 429]
