"""Requests aiohttp's HTTP parser refuses: each is a JSON 4xx that quotes nothing of the
request (or a clean close), and each is counted by kind in the sidecar's
``pulsecal_http_protocol_errors_total``.

The service runs as ``pulsecal-service`` runs it (``service.server.running``), spoken to
over raw sockets; its sidecar reads the telemetry of the same pod.
"""

import asyncio
import dataclasses
import gzip
import json
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.test_utils import TestClient, make_mocked_request
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from service.server import Running, running
from shared.httpserver import SERVER
from shared.settings import ServiceSettings, SidecarSettings
from shared.telemetry import PROTOCOL_ERROR_KINDS
from sidecar.app import create_app as create_sidecar
from tests.support.env import AiohttpClient, Device
from tests.support.rawhttp import Answer, converse, parse_answer
from tests.support.sidecar import series_values

# In every request, so an answer that quotes the request would show it.
MARKER = b"Zq7echo"
HOST = b"Host: " + MARKER + b"\r\n"
INGEST = b"/ingestion/ppg"


def post(headers: bytes, body: bytes = b"") -> bytes:
    return b"POST " + INGEST + b" HTTP/1.1\r\n" + HOST + headers + b"\r\n" + body


# name: (the request, the status answered, the kind counted)
REFUSED: dict[str, tuple[bytes, int, str]] = {
    "garbage request line": (MARKER + b"\r\n\r\n", 400, "bad_request_line"),
    "invalid method": (
        b"G(" + MARKER + b" / HTTP/1.1\r\n" + HOST + b"\r\n",
        400,
        "bad_request_line",
    ),
    "TLS client hello": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARKER * 8,
        400,
        "tls_handshake",
    ),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + MARKER, 400, "http2_preface"),
    "unknown HTTP version": (
        b"GET /" + MARKER + b" HTTP/3.7\r\n" + HOST + b"\r\n",
        400,
        "bad_version",
    ),
    # llhttp takes these two: the connection refuses them.
    "HTTP/2.0 request line": (
        b"GET /" + MARKER + b" HTTP/2.0\r\n" + HOST + b"\r\n",
        400,
        "bad_version",
    ),
    "HTTP/0.9 request line": (
        b"GET /" + MARKER + b" HTTP/0.9\r\n" + HOST + b"\r\n",
        400,
        "bad_version",
    ),
    "CONNECT to another host": (
        b"CONNECT " + MARKER + b".example:443 HTTP/1.1\r\n" + HOST + b"\r\n",
        400,
        "bad_request_target",
    ),
    "CONNECT to a path": (
        b"CONNECT /" + MARKER + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        400,
        "bad_request_target",
    ),
    "asterisk target": (b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n", 400, "bad_request_target"),
    "absolute URL without a path": (
        b"GET http://" + MARKER + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        400,
        "bad_request_target",
    ),
    "control byte in the URL": (
        b"GET /" + MARKER + b"\x01 HTTP/1.1\r\n" + HOST + b"\r\n",
        400,
        "bad_request_target",
    ),
    "request line too long": (
        b"GET /" + MARKER * 1200 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        414,
        "request_line_too_long",
    ),
    "space in a header name": (
        b"GET / HTTP/1.1\r\n" + HOST + b"Bad Name: " + MARKER + b"\r\n\r\n",
        400,
        "bad_header",
    ),
    "header line without a colon": (
        b"GET / HTTP/1.1\r\n" + HOST + MARKER + b"\r\n\r\n",
        400,
        "bad_header",
    ),
    "NUL in a header value": (
        b"GET / HTTP/1.1\r\n" + HOST + b"X-A: " + MARKER + b"\x00\r\n\r\n",
        400,
        "bad_header",
    ),
    "obsolete line folding": (
        b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\r\n " + MARKER + b"\r\n\r\n",
        400,
        "bad_header",
    ),
    "no Host in HTTP/1.1": (b"GET /" + MARKER + b" HTTP/1.1\r\n\r\n", 400, "bad_header"),
    "header field too long": (
        b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + MARKER * 1200 + b"\r\n\r\n",
        431,
        "header_too_large",
    ),
    "too many headers": (
        b"GET / HTTP/1.1\r\n"
        + HOST
        + b"".join(b"X-%d: %s\r\n" % (i, MARKER) for i in range(200))
        + b"\r\n",
        431,
        "header_too_large",
    ),
    "Content-Length not a number": (
        post(b"Content-Length: " + MARKER + b"\r\n"),
        400,
        "bad_content_length",
    ),
    "two Content-Lengths": (
        post(b"Content-Length: 3\r\nContent-Length: 4\r\n", MARKER),
        400,
        "bad_content_length",
    ),
    "Content-Length overflow": (
        post(b"Content-Length: 99999999999999999999999\r\n", MARKER),
        400,
        "bad_content_length",
    ),
    "Content-Length and chunked": (
        post(b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + MARKER),
        400,
        "bad_transfer_encoding",
    ),
    "unknown Transfer-Encoding": (
        post(b"Transfer-Encoding: " + MARKER + b"\r\n"),
        400,
        "bad_transfer_encoding",
    ),
    "chunk size not hex": (
        post(b"Transfer-Encoding: chunked\r\n", MARKER + b"\r\nabc\r\n0\r\n\r\n"),
        400,
        "bad_chunked_encoding",
    ),
    "chunk without its CRLF": (
        post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc" + MARKER + b"\r\n0\r\n\r\n"),
        400,
        "bad_chunked_encoding",
    ),
    "Content-Encoding br": (
        post(b"Content-Encoding: br\r\nContent-Length: 7\r\n", MARKER),
        415,
        "unsupported_content_encoding",
    ),
    "Content-Encoding zstd": (
        post(b"Content-Encoding: zstd\r\nContent-Length: 7\r\n", MARKER),
        415,
        "unsupported_content_encoding",
    ),
    # aiohttp's parser ignores a coding it does not know: the body would pass as plain.
    "unknown Content-Encoding": (
        post(b"Content-Encoding: " + MARKER + b"\r\nContent-Length: 7\r\n", MARKER),
        415,
        "unsupported_content_encoding",
    ),
    "two Content-Encodings in one field": (
        post(b"Content-Encoding: gzip, deflate\r\nContent-Length: 7\r\n", MARKER),
        415,
        "unsupported_content_encoding",
    ),
    "Expect other than 100-continue": (
        post(b"Expect: " + MARKER + b"\r\nContent-Length: 7\r\n", MARKER),
        417,
        "unsupported_expectation",
    ),
}

CODES = {
    400: "malformed",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    431: "header_fields_too_large",
}


@pytest.fixture
def limits(settings: ServiceSettings) -> ServiceSettings:
    """Long read timeouts: nothing here waits for them."""
    return dataclasses.replace(
        settings, http_header_timeout=30.0, http_body_timeout=30.0, rate_limit_enabled=False
    )


@pytest.fixture
async def service(limits: ServiceSettings, device: Device) -> AsyncIterator[Running]:
    async with running(limits, host="127.0.0.1") as service:
        yield service


@pytest.fixture
async def sidecar(
    aiohttp_client: AiohttpClient, sidecar_settings: SidecarSettings
) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(create_sidecar(sidecar_settings))


async def protocol_errors(
    sidecar: TestClient[web.Request, web.Application], expected: Counter[str]
) -> Counter[str]:
    """The sidecar's counts by kind, once they reach ``expected`` (or after 10 s)."""
    found: Counter[str] = Counter()
    async with asyncio.timeout(10):
        while any(found[kind] < n for kind, n in expected.items()):
            await asyncio.sleep(0.05)
            response = await sidecar.get("/metrics")
            if response.status != 200:
                continue
            text = await response.text()
            found = Counter(
                {
                    dict(labels)["kind"]: int(value)
                    for (name, labels), value in series_values(text).items()
                    if name == "pulsecal_http_protocol_errors_total"
                }
            )
    return found


def assert_refused_as_json(answer: Answer, status: int, kind: str) -> None:
    assert answer.status == status, answer.raw[:300]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["server"] == SERVER
    assert MARKER not in answer.raw
    error = answer.json()["error"]
    assert error["code"] == CODES[status]
    assert error["details"] == {"kind": kind}
    assert error["message"]
    assert "install" not in error["message"].lower()


async def test_every_request_the_parser_refuses_is_a_json_4xx_counted_by_kind(
    service: Running, sidecar: TestClient[web.Request, web.Application]
) -> None:
    answers = {
        name: await converse(service.port, [request]) for name, (request, _, _) in REFUSED.items()
    }

    for name, (_, status, kind) in REFUSED.items():
        assert_refused_as_json(answers[name], status, kind)
    for name in ("Content-Encoding br", "unknown Content-Encoding"):
        assert answers[name].headers["accept-encoding"] == "gzip, deflate", name
    expected = Counter(kind for _, _, kind in REFUSED.values())
    counted = await protocol_errors(sidecar, expected)
    assert counted == {**dict.fromkeys(PROTOCOL_ERROR_KINDS, 0), **expected}


async def test_a_chunked_body_that_breaks_half_way_is_answered_and_counted(
    service: Running, device: Device, sidecar: TestClient[web.Request, web.Application]
) -> None:
    head = post(
        b"Authorization: Bearer "
        + device.token.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    )

    # aiohttp's own handling leaves the handler waiting for the rest of the body for ever.
    answer = await converse(service.port, [head, b'5\r\n{"dev\r\n', 0.2, MARKER + b"\r\n"])

    assert answer.status == 400, answer.raw
    assert MARKER not in answer.raw
    assert answer.json()["error"]["code"] == "malformed"
    assert (await protocol_errors(sidecar, Counter(bad_chunked_encoding=1)))[
        "bad_chunked_encoding"
    ] == 1


async def test_a_body_that_is_not_the_gzip_it_claims_is_counted(
    service: Running, device: Device, sidecar: TestClient[web.Request, web.Application]
) -> None:
    batch = json.dumps(device.batch(1)).encode()
    headers = (
        b"Authorization: Bearer "
        + device.token.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nConnection: close\r\n"
    )

    broken = await converse(
        service.port, [post(headers + b"Content-Length: %d\r\n" % len(batch), batch)]
    )
    real = gzip.compress(batch)
    fine = await converse(
        service.port, [post(headers + b"Content-Length: %d\r\n" % len(real), real)]
    )

    assert broken.status == 400
    assert fine.status == 202
    counted = await protocol_errors(sidecar, Counter(bad_content_encoding=1))
    assert counted["bad_content_encoding"] == 1


async def test_a_well_formed_request_is_not_counted(
    service: Running, sidecar: TestClient[web.Request, web.Application]
) -> None:
    fine = await converse(
        service.port, [b"GET /health/liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
    )
    refused = await converse(service.port, [b"GET / HTTP/1.1\r\n\r\n"])

    assert (fine.status, fine.headers["server"]) == (200, SERVER)
    assert refused.status == 400
    counted = await protocol_errors(sidecar, Counter(bad_header=1))
    assert sum(counted.values()) == 1


async def test_a_refused_head_behind_a_well_formed_one_is_answered_after_it(
    service: Running, sidecar: TestClient[web.Request, web.Application]
) -> None:
    fine = b"GET /health/liveness HTTP/1.1\r\nHost: x\r\n\r\n"
    refused = b"GET /health/liveness HTTP/2.0\r\nHost: x\r\n\r\n"

    answer = await converse(service.port, [fine + refused])

    first = parse_answer(answer.raw)
    second = parse_answer(answer.raw[answer.raw.index(first.body) + len(first.body) :])
    assert (first.status, first.json()) == (200, {"status": "ok"})
    assert_refused_as_json(second, 400, "bad_version")
    assert (await protocol_errors(sidecar, Counter(bad_version=1)))["bad_version"] == 1


async def test_expect_100_continue_is_met_and_the_batch_stored(
    service: Running, device: Device
) -> None:
    batch = json.dumps(device.batch(1)).encode()
    head = post(
        b"Authorization: Bearer "
        + device.token.encode()
        + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
        + b"Connection: close\r\nContent-Length: %d\r\n" % len(batch)
    )

    # The body only once the server has said to go on, as a client that expects does.
    answer = await converse(service.port, [head, 0.3, batch])

    assert answer.raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), answer.raw
    final = parse_answer(answer.raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert (final.status, final.json()["seq"]) == (202, 1)


async def test_an_expectation_in_http_1_0_is_ignored(service: Running) -> None:
    answer = await converse(
        service.port, [b"GET /health/liveness HTTP/1.0\r\nExpect: " + MARKER + b"\r\n\r\n"]
    )

    assert (answer.status, answer.json()) == (200, {"status": "ok"})


def test_the_aiohttp_internals_the_protocol_relies_on_are_there() -> None:
    """shared/httpserver.py names them; this fails first when an aiohttp upgrade moves one."""
    slots = {name for cls in (RequestHandler, BaseProtocol) for name in cls.__slots__}
    assert {"_waiter", "_current_request", "_request_count", "_messages", "_loop"} <= slots
    for method in ("handle_error", "log_exception", "data_received", "set_parser", "force_close"):
        assert callable(getattr(RequestHandler, method)), method
    # A refused head is queued as this, with the parser's exception (or ours) in ``exc``.
    refusal = _ErrInfo(status=400, exc=ValueError(), message="")
    assert (refusal.status, refusal.message) == (400, "")
    request = make_mocked_request("GET", "/", headers={"Connection": "keep-alive"})
    request._cache["keep_alive"] = False
    assert request.keep_alive is False
