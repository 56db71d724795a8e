"""The ingest route's 202 answer, written to the connection in one piece.

``web.Response`` builds a header multidict, fills in defaults, serializes it and walks the
payload writer's state machine: a large share of what a bare aiohttp handler costs per
request in all (BENCHMARKS.md, "Where the time goes"). An ack's head is
fixed but for its length, its date and the rate-limit lines, so ``AckResponse`` writes it
from bytes: status line, headers and body in one ``transport.write``. It keeps what aiohttp
does for a response of its own: the request's HTTP version, ``Connection`` when keep-alive
differs from the version's default, and the writer's flow control. Errors and every other
route use ordinary responses.

The private parts of ``web.StreamResponse`` this relies on: ``_eof_sent`` (set, so aiohttp
sends nothing more), ``_keep_alive`` (read back by the server to keep or close the
connection) and ``_headers`` (headers set before ``prepare``). ``tests/service/test_ingest_http.py``
trips when aiohttp changes them.
"""

import time
from collections.abc import Mapping
from email.utils import formatdate

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11

__all__ = ("AckResponse",)

_HEAD_11 = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: "
_HEAD_10 = b"HTTP/1.0 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: "
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"

_date_second = -1
_date_line = b""


def _http_date() -> bytes:
    """``Date: <IMF-fixdate>\\r\\n`` for now, formatted once per second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_line = b"Date: %s\r\n" % formatdate(now, usegmt=True).encode()
        _date_second = now
    return _date_line


def _header_lines(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        line = f"{name}: {value}\r\n"
        if "\n" in line[:-1] or "\r" in line[:-2]:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(line)
    return "".join(lines).encode("latin-1")


class AckResponse(web.StreamResponse):
    """``202 Accepted`` with a JSON ``body``; ``extra``: more header lines, CRLF-terminated.
    Headers set on ``headers`` before it is sent go out too."""

    def __init__(self, body: bytes, extra: bytes = b"") -> None:
        super().__init__(status=202)
        self._body_bytes = body
        self._extra = extra

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        transport = request.transport
        if transport is None or transport.is_closing():
            # What aiohttp's writer raises too: the server then drops the connection quietly.
            raise ConnectionResetError("the client went away before its answer")
        keep_alive = request.keep_alive
        self._keep_alive = keep_alive
        if request.version == HttpVersion11:
            head = _HEAD_11
            connection = b"" if keep_alive else _CLOSE
        else:
            head = _HEAD_10
            connection = _KEEP_ALIVE if keep_alive else b""
        body = self._body_bytes
        extra = self._extra
        if self._headers:  # set after construction, e.g. traceresponse on a sampled request
            extra += _header_lines(self._headers)
        transport.write(
            b"%s%d\r\n%s%s%s\r\n%s" % (head, len(body), _http_date(), connection, extra, body)
        )
        self._eof_sent = True
        # The writer waits only while the transport is paused (the client reads too slowly).
        await request.writer.drain()
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None  # everything went out in prepare()
