"""``GET /ingestion/ws``: the handshake authenticates the device, then each text message
is decoded, passes the gates, is stored and acked; in that order below.

The handshake, its refusals and the socket's opening and closing are recorded here; each
message's answer is recorded as it is sent.
"""

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web
from loguru import logger
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, set_span_in_context

from shared.errors import error_message, error_response, unavailable_response
from shared.telemetry import http_record, ws_close_record, ws_message_record, ws_open_record
from shared.tracing import TRACEPARENT, format_traceparent, links_from
from shared.wire import BatchError, PpgBatch, decode_batch

from ..appkeys import INGEST
from ..fastpath.keepalive import Peer
from ..fastpath.wsframes import TextSocket
from ..ratelimit import REFUSED, refuse_over_limit_message
from ..state import IngestState
from ..store import STORED, StoreUnavailableError, WriteResult
from .common import WRITE_SPAN, WRITE_SPAN_ATTRIBUTES, ingestion_paused, refuse_unauthenticated

__all__ = ("MAX_UNANSWERED", "WS_ROUTE", "DeviceSocket", "ingest_ws")

WS_ROUTE = "/ingestion/ws"

# A socket stops being read while this many of its messages wait for their answer (a device
# that sends without waiting for acks), and is read again at half of it; also while its
# answers fill the transport's buffer (a device that does not read them).
MAX_UNANSWERED = 32

_MESSAGE_SPAN_ATTRIBUTES = {"http.route": WS_ROUTE, "messaging.operation": "receive"}


async def ingest_ws(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    state = request.app[INGEST]
    if not state.tokens.loaded or state.draining:
        refusal = unavailable_response("not accepting connections now", state.retry_after)
        return _refused(state, started, refusal)
    # Authenticate, once for the socket.
    device_id = state.tokens.authenticate(request.headers.get("Authorization"))
    if device_id is None:
        return _refused(state, started, await refuse_unauthenticated(state, request, WS_ROUTE))
    traceparent = request.headers.get(TRACEPARENT)
    socket = DeviceSocket(
        state, request, device_id, links_from([traceparent]) if traceparent is not None else []
    )
    ws = socket.ws
    # Before any await: the token the device has now is the one just authenticated.
    state.tokens.hold(socket, device_id)
    try:
        await ws.prepare(request)
    except web.HTTPException as e:
        # aiohttp checks the handshake (Upgrade, Connection, key, version) here, before
        # anything is written.
        state.tokens.release(socket)
        refusal = error_response(e.status, f"not a WebSocket handshake: {e.text}")
        return _refused(state, started, refusal)
    except BaseException:
        state.tokens.release(socket)
        raise
    record = state.telemetry.record
    record(ws_open_record(WS_ROUTE))
    peer = socket.peer
    state.websockets[ws] = peer
    if socket.revoked is not None:  # while the handshake was on its way
        socket.wind_down()
    try:
        # Text messages reach this loop only where aiohttp's internals could not be used.
        async for msg in ws:
            peer.heard = True
            if msg.type is WSMsgType.TEXT:
                socket.take(msg.data)
            elif msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.close(
                    code=WSCloseCode.UNSUPPORTED_DATA, message=b"only text messages are accepted"
                )
                break
            # ERROR messages end the loop: aiohttp has already closed with the right code.
    except ConnectionResetError:
        pass  # the device went away mid-reply; an unacked batch is retried by the device
    finally:
        state.tokens.release(socket)
        del state.websockets[ws]
        code = 1006 if peer.dropped else ws.close_code or 1006
        record(ws_close_record(WS_ROUTE, code))
    return ws


def _refused(state: IngestState, started: float, response: web.Response) -> web.Response:
    """A refused handshake, counted as a request on the route like the HTTP route's."""
    duration = int((time.perf_counter() - started) * 1e6)
    state.telemetry.record(http_record(WS_ROUTE, "GET", response.status, duration, 0))
    return response


class _Message:
    """One text message until its answer is sent. It is the write's waiter itself
    (``store.Waiter``): the outcome is acted on where Redis's reply is read."""

    __slots__ = (
        "finished",
        "reply",
        "samples",
        "seq",
        "size",
        "socket",
        "span",
        "started",
        "status",
        "trace_id",
        "write_span",
    )

    def __init__(self, socket: "DeviceSocket", size: int) -> None:
        self.socket = socket
        self.started = time.perf_counter()
        self.size = size
        self.seq = 0
        self.samples = 0
        self.reply = ""
        self.status = 0
        self.finished = False
        self.trace_id: str | None = None
        self.span: Span | None = None
        self.write_span: Span | None = None

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: WriteResult, /) -> None:
        self.socket.stored(self, result)

    def set_exception(self, exception: BaseException, /) -> None:
        self.socket.not_stored(self, exception)


class DeviceSocket:
    """A device's socket: each text message is validated and submitted as it is parsed, and
    answered, in the order received, as soon as its write returns. The handler's task is
    not resumed per message (``service/fastpath/wsframes.py``); a device may send several messages
    without waiting, up to ``MAX_UNANSWERED``. Kept small: a pod holds thousands.

    It holds its device's token (``TokenHolder``): when the token cache applies a revocation
    or rotation of it, the socket answers the messages it has taken, refuses any later ones
    with 401 and closes with 1008 (docs/revocation.md)."""

    __slots__ = (
        "background",
        "device_id",
        "links",
        "paused",
        "peer",
        "protocol",
        "refused_in_a_row",
        "revoked",
        "state",
        "unanswered",
        "ws",
    )

    def __init__(
        self, state: IngestState, request: web.Request, device_id: str, links: list[Link]
    ) -> None:
        self.state = state
        self.device_id = device_id
        self.links = links
        self.protocol = request.protocol
        self.peer = Peer(request.transport)
        self.ws = TextSocket(
            self.take,
            max_msg_size=state.max_body_bytes,
            # Keep-alive is one sweeper task for all sockets (service/fastpath/keepalive.py), which
            # sees pings and pongs only when they are not answered and swallowed here.
            autoping=False,
            # Device batches are small and CPU is the scarce resource on the ingest path.
            compress=False,
        )
        # A list, not a deque: it rarely holds more than one (a deque costs 760 bytes empty).
        self.unanswered: list[_Message] = []
        self.refused_in_a_row = 0
        self.paused = False
        self.background: set[asyncio.Task[Any]] | None = None  # made when first needed
        # Why the token this socket was opened with stopped working, once it has.
        self.revoked: str | None = None

    def take(self, data: str) -> None:
        """One text message (from the frame parser, or from the handler's loop), through
        the steps up to its write; ``stored`` takes it from there."""
        self.peer.heard = True
        if self.ws.closed:
            return  # after our close frame: dropped unanswered, as aiohttp drops it
        message = _Message(self, len(data))
        self.unanswered.append(message)
        self.state.batches_in_flight += 1
        try:
            if self.state.tracing.decide(None):
                self._trace(message)
            batch = self._decode(message, data)
            if batch is not None and self._admit(message, batch):
                self._store(message, batch, data)
        except Exception:  # noqa: BLE001 - a bug answers 500 and is logged; the socket stays
            logger.exception("unhandled error on a message of {}", WS_ROUTE)
            if not message.finished:
                self._finish(message, error_message(500, "internal error", None), 500, 0)
        if not self.paused and (
            len(self.unanswered) >= MAX_UNANSWERED or self.protocol.writing_paused
        ):
            self.pause()

    def _trace(self, message: _Message) -> None:
        """A sampled message: a trace of its own, linked to the handshake's."""
        message.span = span = self.state.tracing.tracer.start_span(
            f"WS {WS_ROUTE}",
            kind=SpanKind.SERVER,
            links=self.links,
            attributes=_MESSAGE_SPAN_ATTRIBUTES,
        )
        message.trace_id = f"{span.get_span_context().trace_id:032x}"

    def _decode(self, message: _Message, data: str) -> PpgBatch | None:
        """The message as a batch of the socket's device; else it is answered (400, 422,
        403, or 401 once the socket's token stopped working) and None."""
        try:
            batch = decode_batch(data)
        except BatchError as e:
            status = 400 if e.kind == "malformed" else 422
            self._finish(
                message, error_message(status, e.message, _seq_of(data), e.details), status
            )
            return None
        message.seq = batch.seq
        if batch.device_id != self.device_id:
            if self.revoked is not None:
                # A socket whose token stopped working stands for no device (its device_id
                # is ""): every message lands here, and a valid one costs no extra check.
                self._finish(message, error_message(401, self.revoked, batch.seq), 401)
                return None
            reply = error_message(
                403, "the token is not for this device", batch.seq, {"field": "device_id"}
            )
            self._finish(message, reply, 403)
            return None
        return batch

    def _admit(self, message: _Message, batch: PpgBatch) -> bool:
        """The gates before the write: while ingestion is paused the message is answered
        503. The device's rate limit is decided in the write itself (``stored``)."""
        refusal = ingestion_paused(self.state)
        if refusal is None:
            return True
        reply = error_message(503, refusal, batch.seq, retry_after=self.state.retry_after)
        self._finish(message, reply, 503)
        return False

    def _store(self, message: _Message, batch: PpgBatch, data: str) -> None:
        """Submit the batch; its outcome comes to ``stored`` or ``not_stored``."""
        state = self.state
        message.samples = len(batch.ppg)
        trace = b""
        if message.span is not None:
            message.write_span = state.tracing.tracer.start_span(
                WRITE_SPAN,
                context=set_span_in_context(message.span),
                kind=SpanKind.PRODUCER,
                attributes=WRITE_SPAN_ATTRIBUTES,
            )
            trace = format_traceparent(message.write_span.get_span_context()).encode()
        try:
            state.writer.submit_to(self.device_id, batch.seq, data.encode(), message, trace)
        except StoreUnavailableError as e:
            self.not_stored(message, e)

    def stored(self, message: _Message, result: WriteResult) -> None:
        """What Redis decided for the message's batch: the rate limit's refusal, or the
        ack. An ack carries no rate-limit headers: only a verdict over the limit matters."""
        try:
            if message.write_span is not None:
                message.write_span.set_attribute("pulsecal.write.stored", result.stored == STORED)
                message.write_span.end()
            if result.verdict >= REFUSED:
                reply = refuse_over_limit_message(self.state, WS_ROUTE, result, message.seq)
                if reply is not None:
                    self._finish(message, reply, 429)
                    return
            if result.stored == STORED:
                self._finish(message, f'{{"ack":{message.seq}}}', 202, message.samples)
            else:
                self._finish(message, f'{{"ack":{message.seq},"duplicate":true}}', 202)
        except Exception:  # noqa: BLE001 - never into the writer's loop
            logger.exception("unhandled error answering a message of {}", WS_ROUTE)
            if not message.finished:
                self._finish(message, error_message(500, "internal error", message.seq), 500)

    def not_stored(self, message: _Message, error: BaseException) -> None:
        """Redis did not take the batch: 503, not acknowledged; the device retries."""
        if message.write_span is not None:
            message.write_span.record_exception(error)
            message.write_span.set_status(Status(StatusCode.ERROR, str(error)))
            message.write_span.end()
        reply = error_message(
            503,
            f"cannot store the batch now: {error}",
            message.seq,
            retry_after=self.state.retry_after,
        )
        self._finish(message, reply, 503)

    def _finish(self, message: _Message, reply: str, status: int, samples: int = 0) -> None:
        message.reply = reply
        message.status = status
        message.samples = samples
        message.finished = True
        if message.span is not None:
            message.span.set_attribute("pulsecal.ws.status", status)
            message.span.end()
        if self.unanswered[0] is message:
            self._answer()

    def _answer(self) -> None:
        """Send the answers now due: in order, so each waits for those before it."""
        state = self.state
        record = state.telemetry.record
        unanswered = self.unanswered
        while unanswered and unanswered[0].finished:
            message = unanswered.pop(0)
            state.batches_in_flight -= 1
            # Once the socket is closing the answer is dropped: the device retries an
            # unacknowledged batch, and a stored one is then acked as a duplicate.
            self.ws.send_text_frame(message.reply)
            if message.status == 429:
                self.refused_in_a_row += 1
                if self.refused_in_a_row == state.ws_close_after:
                    self._spawn(
                        self.ws.close(
                            code=WSCloseCode.POLICY_VIOLATION,
                            message=b"rate limit exceeded again and again",
                        )
                    )
            else:
                self.refused_in_a_row = 0
            record(
                ws_message_record(
                    WS_ROUTE,
                    message.status,
                    int((time.perf_counter() - message.started) * 1e6),
                    message.size,
                    message.samples,
                    message.trace_id,
                )
            )
        if self.paused and len(unanswered) <= MAX_UNANSWERED // 2:
            if self.revoked is not None:
                if not unanswered:
                    self._close_revoked()
            elif not self.protocol.writing_paused:
                self._resume()

    def pause(self) -> None:
        """Stop reading the device's messages until it has taken enough of its answers."""
        self.paused = True
        self.protocol.pause_reading()
        if self.protocol.writing_paused:
            # Read again once the device has taken its answers.
            self._spawn(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        writer = self.ws.payload_writer
        if writer is not None:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        if self.paused and len(self.unanswered) <= MAX_UNANSWERED // 2:
            self._resume()

    def _resume(self) -> None:
        if self.revoked is not None:
            return  # it stays "paused" until it is closed (token_revoked)
        self.paused = False
        if self.protocol.transport is not None and not self.ws.closed:
            self.protocol.resume_reading()

    def token_revoked(self, reason: str) -> None:
        """The device's token stopped working (the token cache applied its revocation or
        rotation): messages taken before are answered, later ones refused with 401, then
        the socket closes with 1008."""
        self.revoked = reason
        self.device_id = ""
        if self.ws in self.state.websockets:  # else ingest_ws winds it down once open
            self.wind_down()

    def wind_down(self) -> None:
        # "Paused" routes each answer through the check in _answer that closes the socket
        # once nothing is left unanswered; reading goes on, for the device's close frame.
        self.paused = True
        if not self.unanswered:
            self._close_revoked()

    def _close_revoked(self) -> None:
        assert self.revoked is not None
        if self.protocol.transport is not None and not self.ws.closed:
            self.protocol.resume_reading()  # when it was paused: the close needs the reply
        self._spawn(self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=self.revoked.encode()))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self.background is None:
            self.background = set()
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


class _Seq(msgspec.Struct):
    seq: int | None = None


_seq_decoder = msgspec.json.Decoder(_Seq)


def _seq_of(data: str) -> int | None:
    """The seq of a message that failed validation, when one can be read from it."""
    try:
        return _seq_decoder.decode(data).seq
    # msgspec raises RecursionError for JSON nested deeper than the interpreter's stack
    # allows, in the values it skips too: such a message has no seq to read.
    except (msgspec.DecodeError, RecursionError):
        return None
