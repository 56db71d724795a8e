"""Rate limits: exact across replicas, per device and per client IP, headers, fallback."""

import asyncio
import ipaddress
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientSession, TCPConnector, WSMsgType, web
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from service.ratelimit import (
    GCRA_LUA,
    LocalLimiter,
    Policy,
    Window,
    decision_from_reply,
    rate_limit_headers,
    rate_limit_lines,
)
from shared.keys import Keys
from shared.settings import ServiceSettings, SettingsError, load_settings
from shared.telemetry import Kind
from tests.support.env import REDIS_URL, AiohttpClient, Device, DeviceFactory
from tests.support.procs import RedisServer, ServiceProcess, free_port
from tests.support.telemetry import read_records

Client = TestClient[web.Request, web.Application]
URL = "/ingestion/ppg"
WS_URL = "/ingestion/ws"
_ITEM = re.compile(r'^"(?P<name>[^"]+)"(?P<params>(;[a-z]+=\d+)*)$')


def parse_items(value: str) -> dict[str, dict[str, int]]:
    """A structured-field list of ``"name";key=int;...`` items, as the draft defines them."""
    items: dict[str, dict[str, int]] = {}
    for item in value.split(","):
        match = _ITEM.match(item.strip())
        assert match is not None, f"not a structured-field item: {item!r}"
        params = (p.split("=") for p in match["params"].split(";")[1:])
        items[match["name"]] = {k: int(v) for k, v in params}
    return items


async def post(
    client: Client, device: Device, seq: int, **headers: str
) -> tuple[int, dict[str, str]]:
    response = await client.post(URL, json=device.batch(seq), headers={**device.headers, **headers})
    await response.read()
    return response.status, dict(response.headers)


@pytest.fixture
def limited(settings: ServiceSettings) -> ServiceSettings:
    return replace(
        settings,
        rate_limit_max=3,
        rate_limit_ttl=60,
        rate_limit_burst_max=0,
        rate_limit_ingest_max=5,
        rate_limit_ingest_ttl=60,
    )


async def test_a_device_gets_exactly_its_limit_then_429_with_headers(
    aiohttp_client: AiohttpClient, limited: ServiceSettings, device: Device
) -> None:
    client = await aiohttp_client(create_app(limited))

    outcomes = [await post(client, device, seq) for seq in range(1, 9)]

    assert [status for status, _ in outcomes] == [202] * 5 + [429] * 3
    remaining = [int(headers["X-RateLimit-Remaining"]) for _, headers in outcomes]
    assert remaining == [4, 3, 2, 1, 0, 0, 0, 0]
    refused = outcomes[-1][1]
    assert 1 <= int(refused["Retry-After"]) <= 12  # one request every 60 s / 5
    assert refused["Retry-After"] == refused["X-RateLimit-Reset"]


async def test_headers_parse_and_agree_with_the_decision(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device
) -> None:
    configured = replace(
        settings,
        rate_limit_ingest_max=100,
        rate_limit_ingest_ttl=60,
        rate_limit_ingest_burst_max=3,
        rate_limit_ingest_burst_ttl=10,
    )
    client = await aiohttp_client(create_app(configured))

    first_status, first = await post(client, device, 1)
    second_status, second = await post(client, device, 2)

    assert (first_status, second_status) == (202, 202)
    assert parse_items(first["RateLimit-Policy"]) == {
        "default": {"q": 100, "w": 60},
        "burst": {"q": 3, "w": 10},
    }
    # The tighter window is the one reported.
    assert parse_items(first["RateLimit"]) == {"burst": {"r": 2, "t": 4}}
    assert parse_items(second["RateLimit"])["burst"]["r"] == 1
    assert (first["X-RateLimit-Limit"], first["X-RateLimit-Remaining"]) == ("3", "2")
    assert first["X-RateLimit-Reset"] == str(parse_items(first["RateLimit"])["burst"]["t"])


async def test_a_window_refills_as_specified(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device
) -> None:
    configured = replace(
        settings, rate_limit_ingest_max=100, rate_limit_ingest_burst_max=4,
        rate_limit_ingest_burst_ttl=2.0,
    )  # fmt: skip
    client = await aiohttp_client(create_app(configured))

    burst = [(await post(client, device, seq))[0] for seq in range(1, 6)]
    await asyncio.sleep(0.5 + 0.05)  # one interval (2 s / 4): room for exactly one more
    one_more = [(await post(client, device, seq))[0] for seq in range(6, 8)]
    await asyncio.sleep(2.0 + 0.05)  # the whole window: a full burst again
    refilled = [(await post(client, device, seq))[0] for seq in range(8, 13)]

    assert burst == [202, 202, 202, 202, 429]
    assert one_more == [202, 429]
    assert refilled == [202, 202, 202, 202, 429]


async def test_websocket_messages_share_the_device_budget_and_abuse_closes_with_1008(
    aiohttp_client: AiohttpClient, limited: ServiceSettings, device: Device
) -> None:
    client = await aiohttp_client(create_app(replace(limited, rate_limit_ws_close_after=3)))
    statuses = [(await post(client, device, seq))[0] for seq in (1, 2, 3)]

    replies = []
    async with client.ws_connect(WS_URL, headers=device.headers) as ws:
        for seq in range(4, 10):
            await ws.send_json(device.batch(seq))
            message = await ws.receive(timeout=5)
            if message.type is not WSMsgType.TEXT:
                break
            replies.append(msgspec.json.decode(message.data))
        closed = await ws.receive(timeout=5) if message.type is WSMsgType.TEXT else message

    assert statuses == [202, 202, 202]
    assert replies[:2] == [{"ack": 4}, {"ack": 5}]
    refusals = replies[2:]
    assert len(refusals) == 3
    assert all(r["error"]["status"] == 429 and r["error"]["retry_after"] >= 1 for r in refusals)
    assert [r["seq"] for r in refusals] == [6, 7, 8]
    assert closed.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
    assert ws.close_code == 1008


async def test_failed_authentication_counts_against_the_client_ip(
    aiohttp_client: AiohttpClient, limited: ServiceSettings, device: Device
) -> None:
    client = await aiohttp_client(create_app(limited))
    guesses = []
    for i in range(5):
        response = await client.post(
            URL, json=device.batch(1), headers={"Authorization": f"Bearer pct_guess{i}"}
        )
        guesses.append(response.status)

    assert guesses == [401, 401, 401, 429, 429]
    # The device itself is not punished for its address's guessing.
    assert (await post(client, device, 1))[0] == 202


async def test_health_routes_are_never_limited_under_a_flood(
    aiohttp_client: AiohttpClient, limited: ServiceSettings
) -> None:
    client = await aiohttp_client(create_app(limited))
    paths = ["/health/liveness", "/health/readiness", "/health/startup", "/health"]

    responses = await asyncio.gather(*(client.get(paths[i % 4]) for i in range(80)))

    # Health answers for itself (a dependency may still be starting); it is never a 429.
    assert 429 not in {r.status for r in responses}
    assert {r.status for r in responses[::4]} == {200}  # liveness
    assert not any("RateLimit" in r.headers for r in responses)
    unknown = [(await client.get("/nowhere")).status for _ in range(4)]
    assert unknown == [404, 404, 404, 429]


async def test_forwarded_for_counts_only_from_a_trusted_proxy(
    aiohttp_client: AiohttpClient, limited: ServiceSettings
) -> None:
    untrusted = await aiohttp_client(create_app(limited))
    spoofed = [
        (await untrusted.get("/nowhere", headers={"X-Forwarded-For": f"203.0.113.{i}"})).status
        for i in range(4)
    ]

    trusted_settings = replace(limited, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    trusted = await aiohttp_client(create_app(trusted_settings))
    one_client = [
        (
            await trusted.get("/nowhere", headers={"X-Forwarded-For": "198.51.100.7, 127.0.0.1"})
        ).status
        for _ in range(4)
    ]
    other_client = (
        await trusted.get("/nowhere", headers={"X-Forwarded-For": "198.51.100.8"})
    ).status

    assert spoofed == [404, 404, 404, 429]
    assert one_client == [404, 404, 404, 429]
    assert other_client == 404


@pytest.mark.parametrize(
    ("setting", "lines"),
    [
        # The nearest address is not one: the client's own addresses left of it prove nothing.
        ("x-forwarded-for", [("X-Forwarded-For", "203.0.113.{i}, unknown")]),
        ("forwarded", [("Forwarded", 'for=203.0.113.{i}, for="_hidden"')]),
        # A proxy that adds a header line of its own: the lines are one list, in order.
        ("forwarded", [("Forwarded", "for=203.0.113.{i}"), ("Forwarded", "for=198.51.100.7")]),
        ("x-forwarded-for", [("X-Forwarded-For", "203.0.113.{i}"), ("X-Forwarded-For", "")]),
    ],
)
async def test_addresses_left_of_the_nearest_untrusted_hop_never_count(
    aiohttp_client: AiohttpClient,
    limited: ServiceSettings,
    setting: str,
    lines: list[tuple[str, str]],
) -> None:
    configured = replace(
        limited,
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
        trusted_proxy_header=setting,
    )
    client = await aiohttp_client(create_app(configured))

    statuses = []
    for i in range(5):
        headers = CIMultiDict((name, value.format(i=i)) for name, value in lines)
        statuses.append((await client.get("/nowhere", headers=headers)).status)

    assert statuses == [404, 404, 404, 429, 429]


# Behind a real reverse proxy: the service trusts only the proxy's address (127.0.0.2, the
# address it connects from); clients reach the proxy from other loopback addresses.
PROXY_ADDRESS = "127.0.0.2"
PROXY_SESSION = web.AppKey("proxy_session", ClientSession)


def _proxy_app(upstream: str, header: str) -> web.Application:
    """A reverse proxy that appends the address each request came from to ``header`` (as
    nginx's ``$proxy_add_x_forwarded_for`` does) and passes every other header through."""

    async def forward(request: web.Request) -> web.Response:
        headers = request.headers.copy()
        for name in ("Host", "Content-Length", "Transfer-Encoding"):
            headers.popall(name, None)
        sent = ", ".join(headers.popall(header, ()))
        hop = request.remote or ""
        hop = f'for="{hop}"' if header == "Forwarded" else hop
        headers[header] = f"{sent}, {hop}" if sent else hop
        async with request.app[PROXY_SESSION].request(
            request.method, upstream + request.path_qs, headers=headers, data=await request.read()
        ) as response:
            body = await response.read()
            passed = {k: v for k, v in response.headers.items() if k.startswith(("X-", "Rate"))}
            return web.Response(status=response.status, body=body, headers=passed)

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = TCPConnector(local_addr=(PROXY_ADDRESS, 0))
        async with ClientSession(connector=connector) as client:
            app[PROXY_SESSION] = client
            yield

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", forward)
    app.cleanup_ctx.append(session)
    return app


@pytest.mark.parametrize(
    ("proxy_header", "setting", "client_header"),
    [
        ("X-Forwarded-For", "x-forwarded-for", "Forwarded"),
        ("Forwarded", "forwarded", "X-Forwarded-For"),
    ],
)
async def test_behind_a_trusted_proxy_a_client_cannot_pick_its_own_identity(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    limited: ServiceSettings,
    proxy_header: str,
    setting: str,
    client_header: str,
) -> None:
    """Whatever the client writes in either header, per request, it gets the one budget of
    the address the proxy saw; another client behind the same proxy gets its own."""
    configured = replace(
        limited,
        trusted_proxies=(ipaddress.ip_network(f"{PROXY_ADDRESS}/32"),),
        trusted_proxy_header=setting,
    )
    service = await aiohttp_client(create_app(configured))
    proxy = await aiohttp_server(_proxy_app(str(service.make_url("")), proxy_header))

    async def statuses(client_address: str, requests: int) -> list[int]:
        connector = TCPConnector(local_addr=(client_address, 0))
        async with ClientSession(connector=connector) as session:
            seen = []
            for i in range(requests):
                spoofed = {
                    client_header: f"for=203.0.113.{i}"
                    if client_header == "Forwarded"
                    else f"203.0.113.{i}",
                    proxy_header: f"for=198.51.100.{i}"
                    if proxy_header == "Forwarded"
                    else f"198.51.100.{i}",
                }
                async with session.get(proxy.make_url("/nowhere"), headers=spoofed) as response:
                    seen.append(response.status)
            return seen

    first = await statuses("127.0.0.1", 8)
    second = await statuses("127.0.0.3", 2)

    assert first == [404] * 3 + [429] * 5
    assert second == [404, 404]


async def test_shadow_mode_counts_but_lets_through(
    aiohttp_client: AiohttpClient,
    limited: ServiceSettings,
    device: Device,
    redis: Redis,
    keys: Keys,
) -> None:
    app = create_app(replace(limited, rate_limit_ingest_max=2, rate_limit_shadow=("ingest",)))
    client = await aiohttp_client(app)

    statuses = [(await post(client, device, seq))[0] for seq in range(1, 5)]
    telemetry = await read_records(redis, keys, limited.pod, flush=app[INGEST].telemetry)
    over = [r for r in telemetry if r[0] == Kind.RATE_LIMITED]

    assert statuses == [202] * 4
    assert [(r[1], r[2], r[3]) for r in over] == [(URL, "ingest", 200)] * 2


def test_the_local_limiter_is_the_same_gcra() -> None:
    limiter = LocalLimiter()
    policy = Policy("api", (Window("default", 3, 60),))

    decisions = [limiter.check(policy, "198.51.100.1") for _ in range(4)]
    other = limiter.check(policy, "198.51.100.2")

    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert 19 <= decisions[-1].retry_after <= 20
    assert other.allowed


@pytest.mark.parametrize(
    ("window", "remaining", "reset_ms"), [(1, 99, 600), (2, 0, 10_000), (2, 2, 1), (1, 5, 0)]
)
def test_ack_header_lines_are_the_headers_of_the_decision(
    window: int, remaining: int, reset_ms: int
) -> None:
    policy = Policy("ingest", (Window("default", 100, 60), Window("burst", 3, 10)))
    decision = decision_from_reply(policy, 1, window, remaining, reset_ms)

    lines = rate_limit_lines(policy, window, remaining, reset_ms).decode()

    assert lines.endswith("\r\n")
    parsed = dict(line.split(": ", 1) for line in lines.removesuffix("\r\n").split("\r\n"))
    assert parsed == rate_limit_headers(policy, decision)


def _model_gcra(
    tats: dict[int, float], windows: list[tuple[int, float]], shadow: bool, now: float
) -> list[int]:
    """GCRA as specified (read every cell, write them only if allowed): what the script must
    decide, its cells' TATs in ``tats``."""
    refused, wait, new = 0, 0.0, {}
    for w, (limit, period) in enumerate(windows, 1):
        interval = period / limit
        tat = max(tats.get(w, now), now) + interval
        over = tat - now - period
        if over > 0 and over > wait:
            refused, wait = w, over
        new[w] = tat
    if refused:
        return [3 if shadow else 2, refused, 0, math.ceil(wait)]
    best, remaining, reset = 1, None, 0
    for w, (limit, period) in enumerate(windows, 1):
        tats[w] = new[w]
        ahead = new[w] - now
        left = math.floor((period - ahead) / (period / limit) + 1e-9)
        if remaining is None or left < remaining:
            best, remaining, reset = w, left, math.ceil(ahead)
    assert remaining is not None
    return [1, best, remaining, reset]


_GCRA_AT = (
    GCRA_LUA
    + """
local nw = tonumber(ARGV[1])
return {gcra(1, nw, tonumber(ARGV[2]), 3, tonumber(ARGV[3 + 2 * nw]))}
"""
)


@given(
    steps=st.lists(st.floats(min_value=0, max_value=400, allow_nan=False), max_size=40),
    shadow=st.booleans(),
    windows=st.sampled_from([[(5, 1000.0), (2, 100.0)], [(5, 1000.0)], [(3, 250.0)]]),
)
@hypothesis_settings(max_examples=90, deadline=None)
def test_the_gcra_script_decides_as_the_algorithm_specifies(
    steps: list[float], shadow: bool, windows: list[tuple[int, float]]
) -> None:
    """The script gives the decisions of GCRA computed exactly over any sequence of request
    times, refusals and shadow mode included, with one window (its own path) or two: its
    stored TATs read back unchanged."""
    keys = [f"test:gcra:{uuid.uuid4().hex}:{w}" for w in range(1, len(windows) + 1)]
    args: list[Any] = [len(windows), int(shadow)]
    for limit, period in windows:
        args += [limit, period]
    client = SyncRedis.from_url(REDIS_URL)
    script = client.register_script(_GCRA_AT)
    tats: dict[int, float] = {}
    now = 1_000_000.0
    try:
        for step in steps:
            now += step
            assert script(keys=keys, args=[*args, now]) == _model_gcra(tats, windows, shadow, now)
    finally:
        client.delete(*keys)
        client.close()


# Two replicas on one Redis, and Redis going away: real processes, a Redis of the test's own.


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", port=free_port())
    try:
        server.start()
        await server.wait_ready()
        yield server
    finally:
        server.kill()


async def start_service(config: Mapping[str, str], log_dir: Path) -> ServiceProcess:
    process = ServiceProcess(config, log_dir=log_dir)
    process.start()
    await process.wait_started()
    return process


async def test_two_replicas_on_one_redis_allow_exactly_the_limit(
    redis_server: RedisServer, migrated: str, make_device: DeviceFactory, tmp_path: Path
) -> None:
    device = await make_device()
    config = {
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": migrated,
        "REDIS_KEY_PREFIX": "limits:",
        "RATE_LIMIT_INGEST_MAX": "25",
        "RATE_LIMIT_INGEST_TTL": "600",
    }
    replicas = [
        await start_service({**config, "POD_NAME": f"replica-{i}"}, tmp_path / f"r{i}")
        for i in range(2)
    ]
    try:
        async with ClientSession() as session:

            async def send(seq: int) -> int:
                url = replicas[seq % 2].url + URL
                async with session.post(
                    url, json=device.batch(seq), headers=device.headers
                ) as response:
                    return response.status

            statuses = await asyncio.gather(*(send(seq) for seq in range(1, 81)))
    finally:
        for replica in replicas:
            replica.kill()

    assert Counter(statuses) == {202: 25, 429: 55}


async def test_redis_away_falls_back_to_local_limits_then_recovers(
    aiohttp_client: AiohttpClient,
    limited: ServiceSettings,
    redis_server: RedisServer,
) -> None:
    app = create_app(replace(limited, redis_url=redis_server.url, health_check_interval=60))
    client = await aiohttp_client(app)
    shared = [(await client.get("/nowhere")).status for _ in range(2)]

    redis_server.kill()
    await redis_server.exited()
    local = [(await client.get("/nowhere")).status for _ in range(4)]
    fallbacks = app[INGEST].limiter.fallback_decisions

    redis_server.start()
    await redis_server.wait_ready()
    deadline = time.monotonic() + 5
    while (await client.get("/nowhere")).status != 404 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)

    assert shared == [404, 404]
    # The process's own budget (3) starts afresh while Redis is away: 3 pass, then 429.
    assert local == [404, 404, 404, 429]
    assert fallbacks == 4
    assert not app[INGEST].limiter.degraded  # Redis decides again


async def test_fail_closed_refuses_while_redis_is_away(
    aiohttp_client: AiohttpClient, limited: ServiceSettings, redis_server: RedisServer
) -> None:
    app = create_app(replace(limited, redis_url=redis_server.url, rate_limit_fail_mode="closed"))
    client = await aiohttp_client(app)
    before = (await client.get("/nowhere")).status
    redis_server.kill()
    await redis_server.exited()

    during = await client.get("/nowhere")

    assert before == 404
    assert during.status == 503
    assert "Retry-After" in during.headers


def test_the_proxy_header_is_one_of_two_and_named_when_wrong() -> None:
    assert load_settings({}, ServiceSettings).trusted_proxy_header == "x-forwarded-for"
    assert (
        load_settings({"TRUSTED_PROXY_HEADER": "Forwarded"}, ServiceSettings).trusted_proxy_header
        == "forwarded"
    )
    with pytest.raises(SettingsError, match="TRUSTED_PROXY_HEADER='x-real-ip': expected one of"):
        load_settings({"TRUSTED_PROXY_HEADER": "x-real-ip"}, ServiceSettings)
