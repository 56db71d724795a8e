"""The HTTP server of the service and the sidecar: aiohttp's, with what it lacks.

aiohttp answers a request head its parser refuses in its own words (``text/plain``, quoting
the bytes it choked on, ``Server: Python/3.x aiohttp/3.y``) and counts nothing; it reads a
head or a body without a deadline (only an idle connection has one, ``keepalive_timeout``);
a chunked body whose framing breaks half-way leaves its handler waiting for ever. Served
through ``HttpServer``, each connection is a ``Connection`` (aiohttp's ``RequestHandler``)
that instead:

- answers a refused head as JSON ``{"error": {"code", "message", "details": {"kind"}}}`` with
  the right 4xx (``classify``), never quoting the request, logs it as a sampled warning and
  reports it (``on_error``) for telemetry: kinds from ``PROTOCOL_ERROR_KINDS``;
- refuses, the same way, heads the parser lets through but no route should see
  (``_refused_head``): HTTP/0.9 and HTTP/2.0 request lines, CONNECT and other targets that
  are not a path, a Content-Encoding other than gzip or deflate (aiohttp ignores one it does
  not know and hands the handler the body as if it were plain);
- gives a head ``header_timeout`` from its first byte (a connection's first head: from the
  accept), then answers 408 and closes; a connection that sent nothing is closed silently;
- gives a body ``body_timeout`` from when its handler started: the handler's read then fails
  with a ``RequestPayloadError`` whose cause is a ``RefusedBody`` (code 408), as it does for
  a body whose chunked framing broke; an idle keep-alive connection is closed after
  ``keepalive_timeout`` (aiohttp's own timer);
- for a graceful shutdown, makes the requests in progress answer with ``Connection: close``
  and closes the idle keep-alive connections (``close_after_answers``, ``wait_answered``).

``expect_continue``, given as each route's ``expect_handler``, answers an ``Expect`` other
than ``100-continue`` the same way (aiohttp's own 417 is text, and runs after routing).

Cost per request: a well-formed head and body that arrive in one read cost one more Python
call around aiohttp's ``data_received``, a ``Future.done()`` check and the head's vetting
(its version, method, target's first character and parsed compression, and a lookup of
``Content-Encoding``: about 0.3 µs in all); each further read of a request in progress, a
test of the message queue. A WebSocket's frames cost nothing: the connection hands them to
aiohttp's own ``data_received`` from the handshake on. One task checks the deadlines once
a second or so, over the connections that are not WebSockets.

aiohttp has no public hook for any of this, so the module relies on aiohttp's internals, here
and nowhere else (``tests/shared/test_protocol.py`` fails on the pinned aiohttp if they change):
``RequestHandler``'s methods ``handle_error`` (given the parser's exception for a refused
head), ``log_exception`` (given a payload error from the read after the handler),
``data_received``, ``set_parser``, ``connection_made``, ``connection_lost``, its attributes
``_waiter`` (the future it awaits the next request on), ``_current_request``,
``_request_count``, ``_messages`` (parsed requests; a refused one is an ``_ErrInfo`` with an
``exc``, which this module also queues) and ``_loop``, and ``BaseRequest._cache`` (where
``keep_alive`` is cached). A head parsed other than in ``data_received`` (behind a declined
``Upgrade``, from aiohttp's ``finish_response``) is not vetted.
"""

import asyncio
import contextlib
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol

import msgspec
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import (
    BadHttpMethod,
    ContentEncodingError,
    ContentLengthError,
    DecompressSizeError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from yarl import URL

from .logs import client_errors
from .telemetry import PROTOCOL_ERROR_KINDS

__all__ = (
    "ACCEPT_ENCODING",
    "SERVER",
    "Connection",
    "HttpServer",
    "HttpTimeouts",
    "Limits",
    "ProtocolError",
    "RefusedBody",
    "RefusedHead",
    "classify",
    "error_body",
    "expect_continue",
    "server_header",
)

# What every answer says in its Server header: no versions to look vulnerabilities up by.
SERVER = "pulsecal"

# aiohttp's parser limits (RequestHandler's defaults), quoted in the answers.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
# What aiohttp decodes whatever is installed.
ACCEPT_ENCODING = "gzip, deflate"
# The versions spoken; llhttp also lets HTTP/0.9 and HTTP/2.0 through.
_VERSIONS = (HttpVersion11, HttpVersion10)
# aiohttp reads what is left of a body after its handler answered, for at most this long,
# so the answer is not lost to a reset.
_LINGERING = 10.0
# After the drain begins, idle connections are left this long: a request already sent on
# one is read and answered rather than cut off.
_SETTLE = 0.1
_POLL = 0.01

_CODES = {
    400: "malformed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    431: "header_fields_too_large",
    500: "internal",
}
_REASONS = {408: "Request Timeout"}


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A request refused below the routes: the kind (bounded), the status answered and a
    message of our own (never the request's bytes)."""

    kind: str
    status: int
    message: str


class HttpTimeouts(Protocol):
    """The read deadlines a program's settings give (``HttpSection``'s variables)."""

    @property
    def http_header_timeout(self) -> float: ...
    @property
    def http_body_timeout(self) -> float: ...
    @property
    def http_keepalive_timeout(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float

    @classmethod
    def from_settings(cls, settings: "HttpTimeouts") -> "Limits":
        return cls(
            header_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
            keepalive_timeout=settings.http_keepalive_timeout,
        )


class RefusedBody(HttpProcessingError):
    """The cause of the ``RequestPayloadError`` a body's read fails with when this module
    refuses the body (too slow, its framing broken): ``code`` is the status to answer."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(code=error.status, message=error.message)
        self.error = error


class RefusedHead(HttpProcessingError):
    """A head the parser took and this module refuses (``Connection``'s ``_vet_heads``)."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(code=error.status, message=error.message)
        self.error = error


def _error(kind: str, status: int, message: str) -> ProtocolError:
    assert kind in PROTOCOL_ERROR_KINDS, kind
    return ProtocolError(kind, status, message)


_BAD_REQUEST_LINE = _error("bad_request_line", 400, "the request line is malformed")
_BAD_VERSION = _error(
    "bad_version", 400, "unsupported HTTP version: this server speaks HTTP/1.1 and HTTP/1.0"
)
_HTTP2 = _error("http2_preface", 400, "HTTP/2 is not spoken here: use HTTP/1.1")
_TLS = _error("tls_handshake", 400, "this port speaks plain HTTP, not TLS")
_BAD_TARGET = _error("bad_request_target", 400, "the request target (URL) is malformed")
_NOT_A_PATH = _error(
    "bad_request_target",
    400,
    "the request target must be a path on this server: it is not a proxy (no CONNECT)",
)
_LINE_TOO_LONG = _error(
    "request_line_too_long", 414, f"the request line is longer than {MAX_LINE_SIZE} bytes"
)
_BAD_HEADER = _error("bad_header", 400, "a header field is malformed")
_HEADERS_TOO_LARGE = _error(
    "header_too_large",
    431,
    f"the header fields are too large: at most {MAX_HEADERS} fields, {MAX_FIELD_SIZE} bytes each",
)
_BAD_CONTENT_LENGTH = _error("bad_content_length", 400, "Content-Length is malformed")
_BAD_TRANSFER_ENCODING = _error(
    "bad_transfer_encoding",
    400,
    "Transfer-Encoding is not accepted: send chunked, or Content-Length, not both",
)
_BAD_CHUNKED = _error("bad_chunked_encoding", 400, "the chunked body is malformed")
_UNSUPPORTED_ENCODING = _error(
    "unsupported_content_encoding",
    415,
    f"this Content-Encoding is not supported: use one of {ACCEPT_ENCODING}, or none",
)
_BAD_ENCODING = _error(
    "bad_content_encoding", 400, "the body cannot be decoded as its Content-Encoding says"
)
_INFLATES_TOO_MUCH = _error(
    "bad_content_encoding", 413, "the body decompresses to more than is accepted"
)
_INCOMPLETE = _error("incomplete_body", 400, "the body is shorter than its Content-Length")
_UNSUPPORTED_EXPECTATION = _error(
    "unsupported_expectation", 417, "the only expectation this server meets is 100-continue"
)
_OTHER = _error("other", 400, "the request is malformed")

# The parser's reason (llhttp's, or aiohttp's own checks), lower-cased, by what it names:
# the first rule whose words it contains decides.
_REASON_RULES: tuple[tuple[tuple[str, ...], ProtocolError], ...] = (
    (("pri/upgrade", "http/2 connection preface"), _HTTP2),
    (("https traffic",), _TLS),
    (("invalid http version", "major version", "minor version", "expected http/"), _BAD_VERSION),
    (("url",), _BAD_TARGET),
    (("transfer-encoding",), _BAD_TRANSFER_ENCODING),
    (("content-length",), _BAD_CONTENT_LENGTH),
    (("chunk",), _BAD_CHUNKED),
    (("too many headers",), _HEADERS_TOO_LARGE),
    (("header", "host"), _BAD_HEADER),
    (("method", "start line", "space after", "crlf", "lf after cr", "word"), _BAD_REQUEST_LINE),
)


def classify(error: BaseException) -> ProtocolError:
    """What a refusal of aiohttp's parser (or of a body's read) is, and what to answer."""
    if isinstance(error, RefusedHead):
        return error.error
    if isinstance(error, RequestPayloadError):
        cause = error.__cause__
        if isinstance(cause, RefusedBody):
            return cause.error
        if isinstance(cause, DecompressSizeError):
            return _INFLATES_TOO_MUCH
        if isinstance(cause, ContentEncodingError):
            return _BAD_ENCODING
        if isinstance(cause, ContentLengthError):
            return _INCOMPLETE
        if isinstance(cause, TransferEncodingError):
            return _BAD_CHUNKED
        return _OTHER
    if isinstance(error, LineTooLong):
        # The request line is gathered in a bytearray, a header field in bytes.
        return _LINE_TOO_LONG if isinstance(error.args[0], bytearray) else _HEADERS_TOO_LARGE
    if isinstance(error, InvalidHeader):
        return _BAD_HEADER
    if isinstance(error, InvalidURLError):
        return _BAD_TARGET
    if isinstance(error, ContentEncodingError):
        # Raised on the head: a Content-Encoding nobody installed a decoder for.
        return _UNSUPPORTED_ENCODING
    if isinstance(error, HttpProcessingError):
        # "<reason>:\n\n  <the bytes>\n  <a pointer>", the reason alone, or (llhttp's
        # status and version errors) all that after "Bad status line:".
        text = error.message or ""
        if text.startswith("Bad status line:"):
            text = text.partition(":")[2].lstrip()
        reason = text.partition(":\n")[0].lower()
        for words, result in _REASON_RULES:
            if any(word in reason for word in words):
                return result
        if isinstance(error, BadHttpMethod):
            return _BAD_REQUEST_LINE
    return _OTHER


def _absolute_with_path(url: URL) -> bool:
    """Whether a target that is not a path is an absolute URL whose path the router sees
    (RFC 9112 has a server take ``http://host/path``; ``http://host`` it routes as "")."""
    return url.absolute and url.relative().raw_path[:1] == "/"


def _refused_head(message: Any) -> ProtocolError | None:
    """Why a head the parser took is refused, if it is: a version llhttp lets through but
    this server does not speak (HTTP/0.9, HTTP/2.0), a target no route can see (CONNECT's
    ``host:port``, ``*``: aiohttp would answer its own text/plain 404), a Content-Encoding
    the parser ignored (neither gzip nor deflate: the body would reach its handler still
    encoded, as if it were not)."""
    if message.version not in _VERSIONS:
        return _BAD_VERSION
    if message.method == hdrs.METH_CONNECT or (
        message.path[:1] != "/" and not _absolute_with_path(message.url)
    ):
        return _NOT_A_PATH
    if message.compression is None:
        coding = message.headers.get(hdrs.CONTENT_ENCODING)
        if coding is not None and coding.strip().lower() not in ("", "identity"):
            return _UNSUPPORTED_ENCODING
    return None


def error_body(error: ProtocolError) -> bytes:
    code = _CODES.get(error.status, f"http_{error.status}")
    return msgspec.json.encode(
        {"error": {"code": code, "message": error.message, "details": {"kind": error.kind}}}
    )


def _error_response(error: ProtocolError) -> web.Response:
    headers = {"Server": SERVER}
    if error.status == 415:
        headers["Accept-Encoding"] = ACCEPT_ENCODING
    response = web.Response(
        status=error.status,
        body=error_body(error),
        content_type="application/json",
        headers=headers,
    )
    response.force_close()
    return response


def _raw_response(error: ProtocolError) -> bytes:
    """The whole answer as bytes, for a connection that has no request to answer yet."""
    body = error_body(error)
    head = (
        f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Server: {SERVER}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """The ``expect_handler`` of every route of the service: ``Expect: 100-continue`` is
    met as aiohttp meets it; any other expectation is a 417 in the JSON shape (aiohttp's
    own is text), counted as ``unsupported_expectation``. HTTP/1.0 has no Expect: ignored
    there."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get(hdrs.EXPECT, "").strip().lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The 100 is not the answer: the answer's head is still to come.
        request.writer.output_size = 0
        return None
    connection = request.protocol
    if isinstance(connection, Connection):
        connection._http.report(_UNSUPPORTED_EXPECTATION, request.remote)
    return _error_response(_UNSUPPORTED_EXPECTATION)


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` handler: ``Server: pulsecal`` instead of aiohttp's versions."""
    response.headers["Server"] = SERVER


class Connection(RequestHandler):
    """One HTTP connection (see the module docstring). Made by ``HttpServer`` only."""

    __slots__ = (
        "_body_request",
        "_body_since",
        "_head_bytes",
        "_head_count",
        "_head_since",
        "_http",
        # An instance attribute shadowing the method: uvloop's transport calls the bound
        # method it was given, and a WebSocket swaps in aiohttp's own (set_parser).
        "data_received",
    )

    def __init__(
        self,
        manager: web.Server,
        http: "HttpServer",
        *,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._http = http
        # When the head being awaited began (0: none is), at which request count, and
        # whether any of its bytes came (a connection that sent nothing gets no answer).
        self._head_since = 0.0
        self._head_count = 0
        self._head_bytes = False
        # The request whose handler runs, as the deadline check last saw it, and since when.
        self._body_request: web.BaseRequest | None = None
        self._body_since = 0.0
        self.data_received = self._watched_data_received  # type: ignore[method-assign]  # per instance, see __slots__

    # -- aiohttp's hooks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The first head is due within the header timeout of the accept.
        self._head_since = self._loop.time()
        self._http.watched.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._http.watched.discard(self)
        super().connection_lost(exc)

    def _watched_data_received(self, data: bytes) -> None:
        waiter = self._waiter
        heads = self._request_count
        RequestHandler.data_received(self, data)
        if self._request_count != heads:
            self._vet_heads(self._request_count - heads)
        if waiter is None:
            # A handler runs: this was its body (or requests pipelined behind it).
            if self._messages and self._current_request is not None:
                self._refused_behind()
        elif not waiter.done():
            # Waiting for a request, and what came did not complete its head.
            self._head_bytes = True
            if not self._head_since or self._head_count != self._request_count:
                self._head_since = self._loop.time()
                self._head_count = self._request_count

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        # A WebSocket from here on: its frames go straight to aiohttp, unwatched.
        super().set_parser(parser, data_received_cb)
        self._http.watched.discard(self)
        self.data_received = types.MethodType(RequestHandler.data_received, self)  # type: ignore[method-assign]  # per instance, see __slots__
        transport = self.transport
        if transport is not None:
            transport.set_protocol(self)  # uvloop keeps the bound method until told again

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already: the connection is dropped")
        if status < 500 and isinstance(exc, HttpProcessingError):
            # The parser refused a head: aiohttp queued the refusal as a request.
            error = classify(exc)
            self._http.report(error, request.remote)
            return _error_response(error)
        # A handler raised past its route's own error handling (or timed out): ours.
        self.logger.error(
            "unhandled error handling a request from %s", request.remote, exc_info=exc
        )
        response = web.Response(
            status=status,
            body=msgspec.json.encode(
                {"error": {"code": "internal", "message": "internal error", "details": None}}
            ),
            content_type="application/json",
            headers={"Server": SERVER},
        )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        error = kw.get("exc_info")
        if isinstance(error, RequestPayloadError):
            # Raised again by aiohttp's read of what is left of a body after its handler
            # answered: once per refused body, whatever the handler made of it.
            peer = self.peername
            self._http.report(classify(error), peer[0] if isinstance(peer, tuple) else None)
            return
        super().log_exception(*args, **kw)

    def _vet_heads(self, count: int) -> None:
        """The ``count`` heads just queued: one this server refuses (``_refused_head``)
        becomes a refusal in the queue, as aiohttp queues a head its parser refuses, so it
        is answered (``handle_error``) in its turn and the connection closes after it."""
        messages = self._messages
        # Usually one head per read: a constant tuple is cheaper to loop over than a range.
        for index in (-1,) if count == 1 else range(-min(count, len(messages)), 0):
            message = messages[index][0]
            if type(message) is _ErrInfo:
                continue
            error = _refused_head(message)
            if error is not None:
                refusal = _ErrInfo(status=error.status, exc=RefusedHead(error), message="")
                messages[index] = (refusal, EMPTY_PAYLOAD)

    # -- deadlines -------------------------------------------------------------------------

    def _waiting(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _refused_behind(self) -> None:
        """The parser refused what came after the head of the request being handled (its
        body's chunked framing, say). aiohttp queues the refusal as the next request and the
        body's read waits for ever: it fails now, with the refusal as its cause."""
        request = self._current_request
        for message, _ in self._messages:
            refusal = getattr(message, "exc", None)
            # A RefusedHead is a later request's, whole: this one's body came before it.
            if (
                isinstance(refusal, HttpProcessingError)
                and not isinstance(refusal, RefusedHead)
                and request is not None
            ):
                self._refuse_body(request, classify(refusal))
                return

    def _refuse_body(self, request: web.BaseRequest, error: ProtocolError) -> None:
        payload = request.content
        if payload.is_eof() or payload.exception() is not None:
            return
        failure = RequestPayloadError(error.message)
        failure.__cause__ = RefusedBody(error)
        payload.set_exception(failure)

    def expire(self, now: float, limits: Limits) -> None:
        """Act on a deadline that has passed (called about once a second)."""
        if self._head_since:
            if self._head_count != self._request_count:
                self._head_since = 0.0  # that head came: the request is being handled
                self._head_bytes = False
            elif now - self._head_since >= limits.header_timeout and self._waiting():
                self._head_timed_out(limits)
                return
        request = self._current_request
        if request is None or request is not self._body_request:
            self._body_request = request
            self._body_since = now
        elif now - self._body_since >= limits.body_timeout:
            self._refuse_body(
                request,
                _error(
                    "body_timeout",
                    408,
                    f"the request body did not arrive within {limits.body_timeout:g} s",
                ),
            )

    def _head_timed_out(self, limits: Limits) -> None:
        transport = self.transport
        if self._head_bytes and transport is not None:
            error = _error(
                "header_timeout",
                408,
                f"the request head did not arrive within {limits.header_timeout:g} s",
            )
            transport.write(_raw_response(error))
            peer = self.peername
            self._http.report(error, peer[0] if isinstance(peer, tuple) else None)
        self.force_close()

    # -- shutdown --------------------------------------------------------------------------

    def close_after_answer(self) -> None:
        """The request being handled answers with ``Connection: close`` (and the connection
        closes after it)."""
        request = self._current_request
        if request is not None:
            request._cache["keep_alive"] = False

    @property
    def idle(self) -> bool:
        """Waiting for a request, none of it received."""
        head_begun = self._head_bytes and self._head_count == self._request_count
        return self._waiting() and not head_begun and not self._messages


class _Site(web.BaseSite):
    """A TCP site whose connections are ``Connection`` s."""

    __slots__ = ("_factory", "_host", "_port", "_reuse_address")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        factory: Callable[[], Connection],
        *,
        backlog: int,
        reuse_address: bool | None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._factory = factory
        self._reuse_address = reuse_address

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        # asyncio's and uvloop's servers have sockets; the abstract base does not say so.
        sockets = getattr(self._server, "sockets", None)
        if sockets:
            port: int = sockets[0].getsockname()[1]
            return port
        return self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )


ErrorSink = Callable[[ProtocolError], None]


class HttpServer:
    """Serves ``runner``'s application on a TCP port through ``Connection`` s.

    ``on_error`` gets every ``ProtocolError`` (the service records them for its sidecar).
    """

    def __init__(
        self, runner: web.BaseRunner, *, limits: Limits, on_error: ErrorSink | None = None
    ) -> None:
        self._runner = runner
        self.limits = limits
        self._on_error = on_error
        self._site: _Site | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._draining_since: float | None = None
        # Connections that are not WebSockets: the ones with deadlines.
        self.watched: set[Connection] = set()

    async def start(
        self, host: str, port: int, *, backlog: int = 128, reuse_address: bool | None = None
    ) -> None:
        server = self._runner.server
        if server is None:
            raise RuntimeError("set the runner up first")
        loop = asyncio.get_running_loop()
        limits = self.limits

        def connection() -> Connection:
            return Connection(
                server,
                self,
                loop=loop,
                keepalive_timeout=limits.keepalive_timeout,
                lingering_time=min(_LINGERING, limits.body_timeout),
                access_log=None,
            )

        self._site = _Site(
            self._runner, host, port, connection, backlog=backlog, reuse_address=reuse_address
        )
        await self._site.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="http-deadlines")

    @property
    def port(self) -> int:
        if self._site is None:
            raise RuntimeError("not started")
        return self._site.port

    @property
    def connections(self) -> list[Connection]:
        server = self._runner.server
        if server is None:
            return []
        return [c for c in server.connections if isinstance(c, Connection)]

    def report(self, error: ProtocolError, peer: str | None) -> None:
        client_errors.warn(
            f"http {error.kind}",
            "HTTP request from {} refused below the routes: {} ({})",
            peer or "?",
            error.kind,
            error.status,
        )
        if self._on_error is not None:
            self._on_error(error)

    async def _sweep(self) -> None:
        limits = self.limits
        every = min(1.0, max(0.01, min(limits.header_timeout, limits.body_timeout) / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for connection in list(self.watched):
                connection.expire(now, limits)

    # -- shutdown --------------------------------------------------------------------------

    async def stop_accepting(self) -> None:
        if self._site is not None:
            with contextlib.suppress(RuntimeError):  # stopped already
                await self._site.stop()

    def close_after_answers(self) -> None:
        """From now on every connection closes after its next answer, which says so: the
        requests in progress are told here, later answers by whoever builds them (the
        service's ``on_response_prepare``)."""
        self._draining_since = time.monotonic()
        for connection in self.connections:
            connection.close_after_answer()

    async def wait_answered(self, deadline: float) -> int:
        """Until every request received is answered (and its connection closed), closing
        idle keep-alive connections on the way, or until ``deadline`` (the loop's clock).
        The number of connections still open."""
        loop = asyncio.get_running_loop()
        since = self._draining_since if self._draining_since is not None else time.monotonic()
        await asyncio.sleep(max(0.0, since + _SETTLE - time.monotonic()))
        while True:
            open_ = [c for c in self.connections if c in self.watched]
            for connection in open_:
                if connection.idle:
                    connection.force_close()
            left = sum(1 for c in open_ if c.transport is not None)
            if not left or loop.time() >= deadline:
                return left
            await asyncio.sleep(_POLL)

    async def close(self) -> None:
        """Stop checking deadlines (the runner's cleanup stops the site)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
