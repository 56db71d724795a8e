"""JSON error responses: one shape for every refusal, with the right status (as an HTTP
answer, or as a WebSocket message).

An exception a handler lets through is either the client's doing (a body that cannot be read
as sent, a client that hung up) or ours. ``fault_response`` tells them apart: the client's
is a 4xx in this shape and at most a sampled warning without traceback
(``shared.logs.client_errors``), so a flood of bad requests cannot flood the logs; ours is a
500 and an error with its traceback.
"""

import asyncio
from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import DecompressSizeError, HttpProcessingError
from loguru import logger

from .logs import client_errors

__all__ = (
    "CLIENT_CLOSED",
    "CODES",
    "client_fault",
    "error_body",
    "error_message",
    "error_response",
    "fault_response",
    "hung_up",
    "unavailable_response",
)

# nginx's "client closed request": nobody reads the answer, but telemetry counts it apart
# from the requests that were answered.
CLIENT_CLOSED = 499

CODES: Mapping[int, str] = {
    400: "malformed",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_field",
    429: "rate_limited",
    CLIENT_CLOSED: "client_closed_request",
    500: "internal",
    503: "unavailable",
}


def error_body(status: int, message: str, details: Any = None) -> dict[str, Any]:
    return {"code": CODES.get(status, f"http_{status}"), "message": message, "details": details}


def error_response(
    status: int,
    message: str,
    details: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode({"error": error_body(status, message, details)}),
        content_type="application/json",
        headers=headers,
    )


def unavailable_response(message: str, retry_after: int) -> web.Response:
    """503: nothing was taken, the client tries again after ``retry_after`` seconds."""
    return error_response(503, message, headers={"Retry-After": str(retry_after)})


def error_message(
    status: int,
    message: str,
    seq: int | None,
    details: Any = None,
    *,
    retry_after: int | None = None,
) -> str:
    """An error as one WebSocket text message: the error of the HTTP body, with its status
    (no status line carries it) and the seq of the message it answers."""
    error = error_body(status, message, details)
    error["status"] = status
    if retry_after is not None:
        error["retry_after"] = retry_after
    return msgspec.json.encode({"error": error, "seq": seq}).decode()


def hung_up(request: web.BaseRequest) -> bool:
    """Whether the client has closed the connection ``request`` came on."""
    transport = request.transport
    return transport is None or transport.is_closing()


def client_fault(request: web.BaseRequest, error: BaseException) -> tuple[int, str] | None:
    """(status, message) when ``error`` is the client's doing, None when it is ours."""
    if isinstance(error, web.RequestPayloadError):
        # aiohttp's parser could not take the body as sent (bad gzip or deflate data, a
        # broken chunked encoding): its cause says why, with a 4xx of its own.
        cause = error.__cause__
        if isinstance(cause, DecompressSizeError):
            return 413, "the body decompresses to more than is accepted"
        if isinstance(cause, HttpProcessingError):
            status = cause.code if 400 <= cause.code < 500 else 400
            return status, f"the body cannot be read: {cause.message}"
        return 400, "the body cannot be read"
    # A ConnectionError is the client's only once its connection is gone: the same error
    # from Redis or the AI service's HTTP client is ours.
    if isinstance(error, ConnectionError | asyncio.CancelledError) and hung_up(request):
        return CLIENT_CLOSED, "the client closed the connection before the answer"
    return None


def fault_response(request: web.BaseRequest, route: str, error: Exception) -> web.Response:
    """The answer to ``error``, which a handler of ``route`` let through, and its log line."""
    fault = client_fault(request, error)
    if fault is None:
        logger.opt(exception=error, depth=1).error(
            "unhandled error on {} {}", request.method, route
        )
        return error_response(500, "internal error")
    status, message = fault
    # The kind is bounded: a route template and a status, never the request's own text.
    client_errors.warn(
        f"{route} {status}",
        "{} {} answered {}: {}",
        request.method,
        route,
        status,
        message,
        depth=1,
    )
    return error_response(status, message)
