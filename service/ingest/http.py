"""``POST /ingestion/ppg``: authenticate, decode, the gates, store, ack; in that order below.

The route records its own telemetry: what it needs (samples stored, the trace id of a
sampled request) is known only here.
"""

import asyncio
import time

from aiohttp import web
from opentelemetry.trace import SpanKind

from shared.errors import error_response, fault_response, unavailable_response
from shared.telemetry import http_record
from shared.tracing import TRACEPARENT, format_traceparent
from shared.wire import BatchError, PpgBatch, decode_batch

from ..appkeys import INGEST
from ..edge import count_hang_up
from ..fastpath.acks import AckResponse
from ..ratelimit import ALLOWED, rate_limit_lines, refuse_over_limit
from ..state import IngestState
from ..store import NO_POLICY, STORED, StoreUnavailableError, WriteResult
from .common import (
    BACKLOG_EXCEEDED,
    SHUTTING_DOWN,
    WRITE_SPAN,
    WRITE_SPAN_ATTRIBUTES,
    refuse_unauthenticated,
)

__all__ = ("HTTP_ROUTE", "ingest_http")

HTTP_ROUTE = "/ingestion/ppg"


async def ingest_http(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    state = request.app[INGEST]
    # For telemetry, and to refuse a body declared too large before reading any of it.
    declared = request.content_length or 0
    samples = 0
    trace_id = None
    try:
        # Decided here, before any instrumentation runs: an unsampled request pays nothing more.
        if state.tracing.decide(request.headers.get(TRACEPARENT)):
            response, samples, trace_id = await _traced(state, request, declared)
        else:
            response, samples = await _ingest(state, request, declared, traced=False)
    except Exception as e:  # noqa: BLE001 - the edge answers and logs; it never crashes
        response = fault_response(request, HTTP_ROUTE, e)
    except asyncio.CancelledError:
        count_hang_up(request, HTTP_ROUTE, started)
        raise
    state.telemetry.record(
        http_record(
            HTTP_ROUTE,
            "POST",
            response.status,
            int((time.perf_counter() - started) * 1e6),
            declared,
            samples,
            trace_id,
        )
    )
    return response


async def _traced(
    state: IngestState, request: web.Request, declared: int
) -> tuple[web.StreamResponse, int, str | None]:
    """A sampled request: the aiohttp-server instrumentation around it, its write as a span."""
    samples = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal samples
        response, samples = await _ingest(state, request, declared, traced=True)
        return response

    response, trace_id = await state.tracing.serve(request, handler)
    return response, samples, trace_id


async def _ingest(
    state: IngestState, request: web.Request, declared: int, *, traced: bool
) -> tuple[web.StreamResponse, int]:
    """(response, samples stored): the steps in turn; the first that refuses answers.
    ``declared``: the body's Content-Length (0: none)."""
    # Decided before the body is read: a request that started before shutdown is finished.
    if state.draining:
        return unavailable_response(SHUTTING_DOWN, state.retry_after), 0
    state.batches_in_flight += 1
    try:
        # Authenticate.
        if not state.tokens.loaded:
            return unavailable_response("device tokens are not loaded yet", state.retry_after), 0
        device_id = state.tokens.authenticate(request.headers.get("Authorization"))
        if device_id is None:
            return await refuse_unauthenticated(state, request, HTTP_ROUTE), 0
        # Decode: what the headers say of the body, then the body itself. The exact header
        # is the common case; anything else goes through aiohttp's parser.
        content_type = request.headers.get("Content-Type")
        if content_type != "application/json" and request.content_type != "application/json":
            return error_response(415, "Content-Type must be application/json"), 0
        # A declared length over the limit is refused before reading: aiohttp's read would
        # wait for the body first, however long it was said to be.
        if declared > state.max_body_bytes:
            return error_response(413, f"body exceeds {state.max_body_bytes} bytes"), 0
        try:
            # aiohttp stops reading past client_max_size (MAX_BODY_BYTES), declared or not.
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"body exceeds {state.max_body_bytes} bytes"), 0
        batch = _decode(body, device_id)
        # Not isinstance(batch, web.Response): a response is an ABC's instance, slow to test.
        if not isinstance(batch, PpgBatch):
            return batch, 0
        # The gates: the backlog here; the device's rate limit in the write, answered below.
        if state.backlog.exceeded:
            return unavailable_response(BACKLOG_EXCEEDED, state.retry_after), 0
        # Store. The writer's future itself is awaited: no coroutine frame more to resume.
        try:
            if traced:
                result = await _traced_store(state, device_id, batch.seq, body)
            else:
                result = await state.writer.submit(device_id, batch.seq, body)
        except StoreUnavailableError as e:
            return unavailable_response(f"cannot store the batch now: {e}", state.retry_after), 0
    finally:
        state.batches_in_flight -= 1
    # The rate limit's answer: a refusal, or its headers on the ack.
    extra = b""
    if result.verdict != NO_POLICY:
        if result.verdict != ALLOWED:
            refusal = refuse_over_limit(state, HTTP_ROUTE, result)
            if refusal is not None:
                return refusal, 0
        policy = state.ingest_policy
        assert policy is not None  # a verdict comes only from a policy
        extra = rate_limit_lines(policy, result.window, result.remaining, result.reset_ms)
    # Ack.
    samples = len(batch.ppg)
    stored = result.stored == STORED
    body = b'{"accepted":%d,"seq":%d,"duplicate":%s}' % (
        samples,
        batch.seq,
        b"false" if stored else b"true",
    )
    return AckResponse(body, extra), samples if stored else 0


def _decode(body: bytes, device_id: str) -> PpgBatch | web.Response:
    """The body as a batch of the authenticated device, or the 400, 422 or 403 refusing it."""
    try:
        batch = decode_batch(body)
    except BatchError as e:
        return error_response(400 if e.kind == "malformed" else 422, e.message, e.details)
    if batch.device_id != device_id:
        return error_response(403, "the token is not for this device", {"field": "device_id"})
    return batch


async def _traced_store(
    state: IngestState, device_id: str, seq: int, payload: bytes
) -> WriteResult:
    """The group-committed write of a sampled batch: a client span that the stored entry
    names as its parent, so the worker's span of it joins the trace."""
    with state.tracing.tracer.start_as_current_span(
        WRITE_SPAN, kind=SpanKind.PRODUCER, attributes=WRITE_SPAN_ATTRIBUTES
    ) as span:
        trace = format_traceparent(span.get_span_context()).encode()
        result = await state.writer.submit(device_id, seq, payload, trace)
        span.set_attribute("pulsecal.write.stored", result.stored == STORED)
        return result
