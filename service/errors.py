"""JSON error responses: one shape for every refusal, with the right status."""

from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web

__all__ = ("CODES", "error_body", "error_response")

CODES: Mapping[int, str] = {
    400: "malformed",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_field",
    429: "rate_limited",
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
