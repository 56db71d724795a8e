"""``GET /alerts`` on the service: the operator token, the filters, the error shapes."""

import dataclasses
import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from shared.settings import ServiceSettings
from tests.support.env import AiohttpClient, Device
from tests.support.served import Served, exchange, raw_request

Client = TestClient[web.Request, web.Application]
ADMIN = "op-" + uuid.uuid4().hex
OPERATOR = {"Authorization": f"Bearer {ADMIN}"}
OPERATOR_LINE = f"Authorization: Bearer {ADMIN}".encode()
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def served_by(client: Client) -> Served:
    assert client.port is not None
    return Served(client.app, client.host, client.port)


@pytest.fixture
async def operator_client(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device
) -> Client:
    return await aiohttp_client(create_app(dataclasses.replace(settings, admin_token=ADMIN)))


@pytest.fixture
async def alerts(migrated: str) -> dict[str, str]:
    """Alerts of two devices of this test: one old and cleared, two recent and open."""
    tag = uuid.uuid4().hex[:8]
    first, second = f"api-{tag}-1", f"api-{tag}-2"
    rows: list[tuple[Any, ...]] = [
        (first, "hr_high", "hr", True, 120.0, 150.0, NOW - dt.timedelta(days=2), True),
        (first, "spo2_low", "spo2", False, 90.0, 85.0, NOW - dt.timedelta(minutes=5), False),
        (second, "hr_low", "hr", False, 40.0, 35.0, NOW - dt.timedelta(minutes=1), False),
    ]
    async with await psycopg.AsyncConnection.connect(migrated) as conn:
        for device, rule, metric, above, threshold, value, opened, cleared in rows:
            await conn.execute(
                "INSERT INTO alerts (device_id, rule, metric, above, threshold, value, message,"
                " started_at, opened_at, cleared_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " CASE WHEN %s THEN %s::timestamptz + interval '1 minute' END)",
                (
                    device,
                    rule,
                    metric,
                    above,
                    threshold,
                    value,
                    "m",
                    opened,
                    opened,
                    cleared,
                    opened,
                ),
            )
    return {"first": first, "second": second}


async def test_no_or_unknown_token_is_401_and_a_device_token_is_403(
    operator_client: Client, device: Device, alerts: dict[str, str]
) -> None:
    missing = await operator_client.get("/alerts")
    unknown = await operator_client.get("/alerts", headers={"Authorization": "Bearer nope"})
    as_device = await operator_client.get(
        "/alerts", headers={"Authorization": device.headers["Authorization"]}
    )

    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert (await missing.json())["error"]["code"] == "unauthorized"
    assert unknown.status == 401
    assert as_device.status == 403
    assert (await as_device.json())["error"]["code"] == "forbidden"


async def test_without_an_admin_token_configured_the_api_is_off(
    aiohttp_client: AiohttpClient, settings: ServiceSettings
) -> None:
    client = await aiohttp_client(create_app(settings))

    response = await client.get("/alerts", headers=OPERATOR)

    assert response.status == 403
    assert "ADMIN_TOKEN" in (await response.json())["error"]["message"]


async def test_filters_by_device_since_and_open(
    operator_client: Client, alerts: dict[str, str]
) -> None:
    async def ids(**params: str) -> list[tuple[str, str, bool]]:
        response = await operator_client.get("/alerts", params=params, headers=OPERATOR)
        assert response.status == 200
        body = await response.json()
        return [
            (a["device_id"], a["rule"], a["open"])
            for a in body["alerts"]
            if a["device_id"] in alerts.values()
        ]

    week_ago = (NOW - dt.timedelta(days=7)).isoformat()
    first, second = alerts["first"], alerts["second"]

    assert await ids() == [(second, "hr_low", True), (first, "spo2_low", True)]
    assert await ids(since=week_ago) == [
        (second, "hr_low", True),
        (first, "spo2_low", True),
        (first, "hr_high", False),
    ]
    assert await ids(device_id=first, since=week_ago) == [
        (first, "spo2_low", True),
        (first, "hr_high", False),
    ]
    three_minutes_ago_ms = str(int((NOW - dt.timedelta(minutes=3)).timestamp() * 1000))
    assert await ids(since=three_minutes_ago_ms) == [(second, "hr_low", True)]
    assert await ids(device_id=first, since=week_ago, open="true") == [(first, "spo2_low", True)]


async def test_an_alert_carries_what_an_operator_needs(
    operator_client: Client, alerts: dict[str, str]
) -> None:
    response = await operator_client.get(
        "/alerts", params={"device_id": alerts["second"]}, headers=OPERATOR
    )
    (alert,) = (await response.json())["alerts"]

    assert alert["rule"] == "hr_low"
    assert alert["condition"] == "below"
    assert (alert["threshold"], alert["value"]) == (40.0, 35.0)
    assert alert["cleared_at"] is None
    assert dt.datetime.fromisoformat(alert["opened_at"]) == NOW - dt.timedelta(minutes=1)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "yesterday"}, "since"),
        ({"limit": "0"}, "limit"),
        ({"limit": "5000"}, "limit"),
        ({"open": "maybe"}, "open"),
        ({"device_id": "bad id!"}, "device_id"),
        # Digits str.isdigit() takes and int() refuses, reads, or refuses past 4300 of them.
        ({"limit": "\u00b2"}, "limit"),
        ({"limit": "\u0663"}, "limit"),
        ({"limit": "9" * 5000}, "limit"),
        ({"limit": "0" * 5000 + "1"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "1e2"}, "limit"),
        ({"since": "\u00b2"}, "since"),
        ({"since": "\u0661\u0667\u0660\u0660"}, "since"),
        ({"since": "9" * 5000}, "since"),
        ({"since": "9" * 16}, "since"),
        ({"since": "2024-13-01"}, "since"),
        ({"since": "2024-01-01T00:00:00+25:00"}, "since"),
        ({"since": "\x00"}, "since"),
        ({"device_id": "\x00"}, "device_id"),
        ({"device_id": "d\u00e9v"}, "device_id"),
        ({"device_id": "d" * 65}, "device_id"),
        ({"device_id": "dev-1\n"}, "device_id"),
        ({"open": "\u00b2"}, "open"),
    ],
)
async def test_a_bad_parameter_is_422_naming_it(
    operator_client: Client, params: dict[str, str], field: str
) -> None:
    response = await operator_client.get("/alerts", params=params, headers=OPERATOR)

    assert response.status == 422
    error = (await response.json())["error"]
    assert (error["code"], error["details"]) == ("invalid_field", {"field": field})
    assert field in error["message"]


@pytest.mark.parametrize("field", ["limit", "since", "device_id", "open"])
async def test_a_parameter_that_is_not_utf8_is_422_naming_it(
    operator_client: Client, field: str
) -> None:
    request = raw_request(b"GET", f"/alerts?{field}=%FF%FE1".encode(), OPERATOR_LINE)

    answer = await exchange(served_by(operator_client), request)

    assert answer.status == 422
    assert answer.json()["error"]["details"] == {"field": field}


@pytest.mark.parametrize(
    "since", ["0", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "2024-01-01"]
)
async def test_the_extremes_of_since_are_answered(operator_client: Client, since: str) -> None:
    response = await operator_client.get("/alerts", params={"since": since}, headers=OPERATOR)

    assert response.status == 200
    assert isinstance((await response.json())["alerts"], list)


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer \xff\xfe",
        b"Bearer " + ADMIN.encode() + b"\xff",
        b"Bearer \xc3\xa9t\xc3\xa9",
        b"Bearer \xed\xa0\x80",  # an encoded surrogate, which UTF-8 forbids
        b"\xff",
    ],
)
async def test_an_authorization_header_of_any_bytes_is_401_json(
    operator_client: Client, authorization: bytes
) -> None:
    request = raw_request(b"GET", b"/alerts", b"Authorization: " + authorization)

    answer = await exchange(served_by(operator_client), request)

    assert answer.status == 401
    assert answer.json()["error"]["code"] == "unauthorized"
    assert answer.headers["www-authenticate"] == "Bearer"


async def test_an_operator_token_that_is_not_utf8_works_byte_for_byte(
    aiohttp_client: AiohttpClient, settings: ServiceSettings
) -> None:
    raw_token = b"op-\xff-" + uuid.uuid4().hex.encode()
    # How Python hands over an environment variable holding those bytes.
    token = raw_token.decode("utf-8", "surrogateescape")
    client = await aiohttp_client(create_app(dataclasses.replace(settings, admin_token=token)))
    served = served_by(client)

    right = await exchange(
        served, raw_request(b"GET", b"/alerts", b"Authorization: Bearer " + raw_token)
    )
    wrong = await exchange(
        served, raw_request(b"GET", b"/alerts", b"Authorization: Bearer op-\xfe")
    )

    assert right.status == 200
    assert wrong.status == 401
