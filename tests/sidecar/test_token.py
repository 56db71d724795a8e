"""The sidecar's ``/metrics`` token check takes any ``Authorization`` bytes a client sends."""

import asyncio
import dataclasses
import uuid

import pytest

from shared.settings import SidecarSettings
from sidecar.app import create_app
from sidecar.appkeys import CONSUMER
from tests.support.env import AiohttpClient
from tests.support.served import Served, exchange, raw_request


async def sidecar_with_token(
    aiohttp_client: AiohttpClient, settings: SidecarSettings, token: str
) -> Served:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, metrics_token=token)))
    assert client.port is not None
    return Served(client.app, client.host, client.port)


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer \xff\xfe",
        b"Bearer t\xc3\xb6k\xc3\xa9n",
        b"Bearer \xed\xa0\x80",
        b"bearer \x80",
        b"\xff",
    ],
)
async def test_an_authorization_header_of_any_bytes_is_401(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings, authorization: bytes
) -> None:
    served = await sidecar_with_token(aiohttp_client, sidecar_settings, "s3cret-metrics")

    answer = await exchange(
        served, raw_request(b"GET", b"/metrics", b"Authorization: " + authorization)
    )

    assert answer.status == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")


async def test_a_token_that_is_not_utf8_is_compared_byte_for_byte(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> None:
    raw_token = b"m-\xff-" + uuid.uuid4().hex.encode()
    # How Python hands over an environment variable holding those bytes.
    token = raw_token.decode("utf-8", "surrogateescape")
    served = await sidecar_with_token(aiohttp_client, sidecar_settings, token)
    async with asyncio.timeout(10):
        while served.app[CONSUMER].aggregator is None:  # /metrics is 503 until then
            await asyncio.sleep(0.02)

    right = await exchange(
        served, raw_request(b"GET", b"/metrics", b"Authorization: Bearer " + raw_token)
    )
    wrong = await exchange(
        served, raw_request(b"GET", b"/metrics", b"Authorization: Bearer m-\xfe")
    )

    assert right.status == 200
    assert wrong.status == 401
