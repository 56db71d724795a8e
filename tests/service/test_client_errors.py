"""What a client can get wrong is a JSON 4xx, counted, and at most a sampled warning.

The service runs as ``pulsecal-service`` runs it (``served.serve``), with logging set up as
the process sets it up, writing to a captured stdout and to daily files.
"""

import asyncio
import dataclasses
import gzip
import io
import json
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from loguru import logger
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from service.edge import instrumented
from shared.keys import Keys
from shared.logs import CLIENT_ERROR_INTERVAL, SampledWarnings, client_errors, setup_logging
from shared.settings import ServiceSettings
from shared.telemetry import BATCH_FIELD, Kind, decode_batch
from tests.support.env import Device
from tests.support.served import Served, exchange, hang_up_after, raw_request, serve

INGEST_PATH = b"/ingestion/ppg"
ADMIN = "op-" + uuid.uuid4().hex
DEADLINE = 10.0


@dataclasses.dataclass
class Captured:
    stream: io.StringIO
    log_dir: Path

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def at(self, *levels: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["level"] in levels]

    def error_files(self) -> str:
        return "".join(p.read_text() for p in sorted(self.log_dir.glob("error-*.log")))


@pytest.fixture
def captured(settings: ServiceSettings, tmp_path: Path) -> Iterator[Captured]:
    log_dir = tmp_path / "logs"
    stream = io.StringIO()
    logs = setup_logging(
        dataclasses.replace(settings, log_dir=str(log_dir), enable_file_logging=True),
        program="pulsecal-service",
        stream=stream,
    )
    yield Captured(stream, log_dir)
    logs.close()
    # setup_logging removed loguru's default sink; put an equivalent back for other tests.
    logger.add(lambda message: sys.stderr.write(message))


@pytest.fixture
def service_settings(settings: ServiceSettings) -> ServiceSettings:
    # A thousand requests from one address: the API budget would answer 429 long before.
    return dataclasses.replace(settings, admin_token=ADMIN, rate_limit_enabled=False)


@pytest.fixture
async def served(
    service_settings: ServiceSettings, device: Device, redis: Redis
) -> AsyncIterator[Served]:
    async with serve(create_app(service_settings)) as served:
        yield served


async def statuses(redis: Redis, keys: Keys, pod: str, route: str) -> Counter[int]:
    entries = await redis.xrange(keys.telemetry(pod))
    return Counter(
        status
        for _, fields in entries
        for kind, r, _, status, *_ in decode_batch(fields[BATCH_FIELD]).records
        if kind == Kind.HTTP and r == route
    )


async def counted(
    redis: Redis, keys: Keys, pod: str, route: str, expected: dict[int, int]
) -> Counter[int]:
    """The route's telemetry statuses once they include ``expected`` (or the deadline)."""
    found: Counter[int] = Counter()
    async with asyncio.timeout(DEADLINE):
        while any(found[status] < n for status, n in expected.items()):
            await asyncio.sleep(0.02)
            found = await statuses(redis, keys, pod, route)
    return found


def bearer(device: Device) -> bytes:
    return b"Authorization: Bearer " + device.token.encode()


def json_post(
    device: Device, body: bytes, *headers: bytes, content_length: int | None = None
) -> bytes:
    return raw_request(
        b"POST",
        INGEST_PATH,
        bearer(device),
        b"Content-Type: application/json",
        *headers,
        body=body,
        content_length=content_length,
    )


def half_body(device: Device) -> bytes:
    """The start of a batch that announces 500 bytes."""
    return json_post(device, b'{"device_id": "', content_length=500)


def in_flight(served: Served) -> Callable[[], bool]:
    state = served.app[INGEST]
    return lambda: state.batches_in_flight > 0


# ------------------------------------------------------------------------------ the flood


async def test_a_thousand_malformed_requests_log_no_error_and_a_few_warnings(
    served: Served,
    device: Device,
    captured: Captured,
    redis: Redis,
    keys: Keys,
    service_settings: ServiceSettings,
) -> None:
    per_kind = 200
    not_gzip = json_post(device, b"{not gzip at all}", b"Content-Encoding: gzip")
    bad_json = json_post(device, b"{bad json")
    bad_header = raw_request(b"GET", b"/alerts", b"Authorization: Bearer \xff\xfe\x80")
    bad_limit = raw_request(
        b"GET", b"/alerts?limit=%C2%B2", f"Authorization: Bearer {ADMIN}".encode()
    )
    unparsable = raw_request(b"GET", b"/alerts", b"No colon in this header line")
    before = len(captured.lines())

    answers: dict[str, Counter[int]] = {}
    for name, request, status in (
        ("not gzip", not_gzip, 400),
        ("bad json", bad_json, 400),
        ("bad header bytes", bad_header, 401),
        ("bad limit", bad_limit, 422),
    ):
        answers[name] = Counter()
        for _ in range(per_kind):
            answer = await exchange(served, request)
            assert answer.json()["error"]["code"], answer
            answers[name][answer.status] += 1
        assert answers[name] == {status: per_kind}, name
    for _ in range(per_kind // 2):
        # aiohttp answers what it cannot parse itself: no route, so no telemetry either.
        assert (await exchange(served, unparsable)).status == 400
        await hang_up_after(served, half_body(device), until=in_flight(served))

    pod = service_settings.pod
    ingest = await counted(redis, keys, pod, "/ingestion/ppg", {400: 400, 499: per_kind // 2})
    alerts = await counted(redis, keys, pod, "/alerts", {401: per_kind, 422: per_kind})
    assert (ingest[400], ingest[499], alerts[401], alerts[422]) == (400, 100, 200, 200)
    new_lines = captured.lines()[before:]
    assert [line for line in new_lines if line["level"] not in ("warning", "info")] == []
    assert captured.error_files() == ""
    warnings = [line for line in new_lines if line["level"] == "warning"]
    # One line per kind, a second if the test outlived a sampling interval.
    kinds = Counter(line["client_error"] for line in warnings)
    assert set(kinds) <= {
        "/ingestion/ppg 400",
        "/ingestion/ppg 499",
        "RequestPayloadError",
        "BadHttpMessage",
    }
    assert all(n <= 3 for n in kinds.values()), kinds
    assert all("exception" not in line for line in warnings)


# ------------------------------------------------------------------------------ bodies


async def test_a_body_that_is_not_what_its_content_encoding_says_is_400_json(
    served: Served, device: Device, captured: Captured
) -> None:
    batch = json.dumps(device.batch(1)).encode()

    not_gzip = await exchange(served, json_post(device, batch, b"Content-Encoding: gzip"))
    not_deflate = await exchange(served, json_post(device, batch, b"Content-Encoding: deflate"))
    truncated = await exchange(
        served, json_post(device, gzip.compress(batch)[:-12], b"Content-Encoding: gzip")
    )
    bomb = await exchange(
        served,
        json_post(device, gzip.compress(b" " * (1 << 20) + batch), b"Content-Encoding: gzip"),
    )
    real = await exchange(
        served, json_post(device, gzip.compress(batch), b"Content-Encoding: gzip")
    )

    for answer, encoding in ((not_gzip, "gzip"), (not_deflate, "deflate")):
        assert (answer.status, answer.json()["error"]["code"]) == (400, "malformed")
        assert encoding in answer.json()["error"]["message"]
    # zlib hands over what it could inflate without complaint: the JSON is then cut short.
    assert (truncated.status, truncated.json()["error"]["code"]) == (400, "malformed")
    assert (bomb.status, bomb.json()["error"]["code"]) == (413, "payload_too_large")
    assert (real.status, real.json()["seq"]) == (202, 1)
    assert captured.at("error", "critical") == []


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_a_client_hanging_up_mid_body_is_counted_and_never_an_error(
    service_settings: ServiceSettings,
    device: Device,
    captured: Captured,
    redis: Redis,
    keys: Keys,
    handler_cancellation: bool,
) -> None:
    async with serve(
        create_app(service_settings), handler_cancellation=handler_cancellation
    ) as served:
        for _ in range(3):
            await hang_up_after(served, half_body(device), until=in_flight(served))
        found = await counted(redis, keys, service_settings.pod, "/ingestion/ppg", {499: 3})

    assert found == {499: 3}
    assert captured.at("error", "critical") == []
    assert captured.error_files() == ""


# ------------------------------------------------------------------------------ our faults


async def test_our_own_fault_is_still_500_and_an_error_with_its_traceback(
    service_settings: ServiceSettings, device: Device, captured: Captured, redis: Redis
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise ConnectionResetError("the AI service reset the connection")

    app = create_app(service_settings)
    app.router.add_get("/broken", instrumented("/broken", broken))
    async with serve(app) as served:
        first = await exchange(served, raw_request(b"GET", b"/broken"))
        second = await exchange(served, raw_request(b"GET", b"/broken"))

    assert (first.status, first.json()["error"]["code"]) == (500, "internal")
    assert second.status == 500
    errors = captured.at("error")
    # Never sampled: each of our faults is an error of its own.
    assert [line["message"] for line in errors] == ["unhandled error on GET /broken"] * 2
    assert errors[0]["exception"].endswith(
        "ConnectionResetError: the AI service reset the connection"
    )
    assert errors[0]["context"] == "service.edge"
    assert "unhandled error on GET /broken" in captured.error_files()


# ------------------------------------------------------------------------------ sampling


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_kind_is_logged_once_per_interval_with_the_count_left_out(
    captured: Captured,
) -> None:
    clock = Clock()
    sampled = SampledWarnings(interval=10.0, clock=clock)

    logged = [sampled.warn("bad json", "bad body from {}", "a") for _ in range(50)]
    other = sampled.warn("hang-up", "hung up")
    clock.now += 9.9
    early = sampled.warn("bad json", "bad body from {}", "b")
    clock.now += 0.1
    later = sampled.warn("bad json", "bad body from {}", "c")

    assert logged == [True] + [False] * 49
    assert (other, early, later) == (True, False, True)
    lines = [
        (line["message"], line["client_error"], line["suppressed"])
        for line in captured.at("warning")
    ]
    assert lines == [
        ("bad body from a", "bad json", 0),
        ("hung up", "hang-up", 0),
        ("bad body from c (50 more like it not logged)", "bad json", 50),
    ]
    assert all("exception" not in line for line in captured.lines())


def test_the_process_wide_sampler_starts_afresh_with_logging(captured: Captured) -> None:
    assert client_errors.interval == CLIENT_ERROR_INTERVAL
    assert client_errors.warn("kind", "first")
    assert not client_errors.warn("kind", "second")

    client_errors.reset()

    assert client_errors.warn("kind", "third")
    assert [line["message"] for line in captured.at("warning")] == ["first", "third"]
