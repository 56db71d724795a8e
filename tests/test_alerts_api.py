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
from shared.settings import Settings

from .conftest import AiohttpClient, Device

Client = TestClient[web.Request, web.Application]
ADMIN = "op-" + uuid.uuid4().hex
OPERATOR = {"Authorization": f"Bearer {ADMIN}"}
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture
async def operator_client(
    aiohttp_client: AiohttpClient, settings: Settings, device: Device
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
    aiohttp_client: AiohttpClient, settings: Settings
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
    ],
)
async def test_a_bad_parameter_is_422_naming_it(
    operator_client: Client, params: dict[str, str], field: str
) -> None:
    response = await operator_client.get("/alerts", params=params, headers=OPERATOR)

    assert response.status == 422
    assert (await response.json())["error"]["details"] == {"field": field}
