"""The sidecar, served as ``pulsecal-sidecar`` serves it (``shared/httpserver.py``), meets
``Expect: 100-continue`` and refuses any other expectation on each of its routes as a JSON
417 that quotes nothing of the request, as the service does."""

import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from shared.httpserver import SERVER, HttpServer, Limits, ProtocolError
from shared.settings import SidecarSettings
from sidecar.app import create_app
from tests.support.rawhttp import Answer, converse, parse_answer

OPERATOR = "operator-token-for-tests"
# The expectation, so an answer that quotes the request would show it.
MARKER = b"200-maybe-Zq7echo"
ROUTES = [
    (b"GET", b"/"),
    (b"GET", b"/dashboard/live"),
    (b"POST", b"/signin"),
    (b"GET", b"/health"),
    (b"GET", b"/health/liveness"),
    (b"HEAD", b"/health/liveness"),
    (b"GET", b"/metrics"),
    (b"GET", b"/static/dashboard.css"),
]


@dataclasses.dataclass(frozen=True)
class ServedSidecar:
    port: int
    reported: list[ProtocolError]


@pytest.fixture
async def sidecar(sidecar_settings: SidecarSettings) -> AsyncIterator[ServedSidecar]:
    settings = dataclasses.replace(
        sidecar_settings, environment="production", health_detail_token=OPERATOR
    )
    runner = web.AppRunner(create_app(settings), handle_signals=False, access_log=None)
    await runner.setup()
    reported: list[ProtocolError] = []
    http = HttpServer(runner, limits=Limits.from_settings(settings), on_error=reported.append)
    await http.start("127.0.0.1", 0)
    try:
        yield ServedSidecar(http.port, reported)
    finally:
        await http.close()
        await runner.cleanup()


def request(method: bytes, path: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: sidecar", b"Connection: close"]
    lines += headers
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([*lines, b"", b""]) + body


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[p.decode() for _, p in ROUTES])
async def test_an_expectation_other_than_100_continue_is_a_json_417_on_every_route(
    sidecar: ServedSidecar, method: bytes, path: bytes
) -> None:
    body = b"token=x" if method == b"POST" else b""
    headers = [b"Expect: " + MARKER]
    if body:
        headers.append(b"Content-Type: application/x-www-form-urlencoded")

    answer = await converse(sidecar.port, [request(method, path, *headers, body=body)])

    assert answer.status == 417, answer.raw[:300]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["server"] == SERVER
    assert MARKER not in answer.raw
    if method != b"HEAD":
        assert answer.json()["error"]["code"] == "expectation_failed"
        assert answer.json()["error"]["details"] == {"kind": "unsupported_expectation"}
    assert [e.kind for e in sidecar.reported] == ["unsupported_expectation"]


async def test_expect_100_continue_is_met_and_the_sign_in_answered(
    sidecar: ServedSidecar,
) -> None:
    body = b"token=" + OPERATOR.encode()
    head = request(
        b"POST",
        b"/signin",
        b"Expect: 100-continue",
        b"Content-Type: application/x-www-form-urlencoded",
        b"Content-Length: %d" % len(body),
    )

    # The body only once the sidecar has said to go on, as a client that expects does.
    answer: Answer = await converse(sidecar.port, [head, 0.3, body])

    assert answer.raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), answer.raw[:300]
    final = parse_answer(answer.raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert (final.status, final.headers["location"]) == (303, "/")
    assert sidecar.reported == []
