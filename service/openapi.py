"""The service's HTTP API as an OpenAPI 3.1 document, generated from the types it decodes.

The request body's schema is ``shared.wire.PpgBatch`` itself, through msgspec's JSON Schema
generator, so every bound the decoder enforces is in the document. The handlers write their
answers as bytes or plain dicts (the hot path never builds a Struct to encode it); the Structs
below describe those answers, and ``tests/service/test_fuzz.py`` holds the running service to them.
The WebSocket protocol is in ``docs/websocket.md``.

The document is committed as ``docs/api/openapi.json``; regenerate it with
``python -m service.openapi > docs/api/openapi.json`` (a test fails while it differs).
"""

import datetime as dt
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from shared.errors import CODES
from shared.httpserver import ACCEPT_ENCODING
from shared.wire import DEVICE_ID_PATTERN, PpgBatch

__all__ = ("OPENAPI_ROUTE", "build_document", "document_bytes", "ecma_patterns", "openapi_handler")

OPENAPI_ROUTE = "/openapi.json"
# The contract's version: changes with the API, not with each build.
API_VERSION = "1.0.0"
_REF = "#/components/schemas/{name}"
_JSON = "application/json"
_HEALTH_JSON = "application/health+json"

Timestamp = Annotated[dt.datetime, msgspec.Meta(tz=True)]


class IngestAck(msgspec.Struct, forbid_unknown_fields=True):
    """The `202` of `POST /ingestion/ppg`; `seq` and `accepted` have the batch's bounds."""

    accepted: Annotated[int, msgspec.Meta(description="samples in the batch")]
    seq: int
    duplicate: Annotated[
        bool, msgspec.Meta(description="a retry of a batch already stored: not stored again")
    ]


class ErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    code: str
    message: str
    details: Annotated[
        dict[str, Any] | None,
        msgspec.Meta(
            description="`field` (the field's path) for 403/422, `policy` and `window` for 429"
        ),
    ]


class Error(msgspec.Struct, forbid_unknown_fields=True):
    """Every refusal, whatever the route."""

    error: ErrorBody


class Alert(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    device_id: str
    rule: Annotated[str, msgspec.Meta(examples=["hr_high", "hr_low", "spo2_low", "silence"])]
    metric: str
    condition: Literal["above", "below"]
    threshold: float
    value: float | None
    message: str
    open: bool
    started_at: Timestamp
    opened_at: Timestamp
    cleared_at: Timestamp | None
    cleared_value: float | None


class AlertsPage(msgspec.Struct, forbid_unknown_fields=True):
    """Newest first."""

    alerts: list[Alert]
    count: Annotated[int, msgspec.Meta(ge=0)]
    since: Timestamp


class CheckStatus(msgspec.Struct, kw_only=True):
    """One check in the seed's shape, with details of its own (`used`, `path`...)."""

    status: Literal["up", "down"]
    message: str | msgspec.UnsetType = msgspec.UNSET


class HealthStatus(msgspec.Struct, forbid_unknown_fields=True):
    """A probe's verdict alone: what anyone without the operator's token gets."""

    status: Literal["ok", "error"]


class HealthReport(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The original system's shape, for the operator's token: the verdict and the checks,
    `info` those up, `error` those down, `details` all of them."""

    status: Literal["ok", "error"]
    info: dict[str, CheckStatus]
    error: dict[str, CheckStatus]
    details: dict[str, CheckStatus]


class HealthCheckResult(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    status: Literal["pass", "fail"]
    time: Timestamp
    observedValue: float  # the IETF draft's name
    observedUnit: Literal["ms"]
    output: str | msgspec.UnsetType = msgspec.UNSET


class HealthJsonStatus(msgspec.Struct, forbid_unknown_fields=True):
    """`application/health+json`, when asked for: the verdict alone, for anyone without
    the operator's token."""

    status: Literal["pass", "fail"]


class HealthJson(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`application/health+json` (draft-inadarei-api-health-check), when asked for, with
    the operator's token."""

    status: Literal["pass", "fail"]
    version: str
    releaseId: str  # the IETF draft's name
    serviceId: str  # the IETF draft's name
    checks: dict[str, list[HealthCheckResult]]


class WsAck(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A WebSocket message stored (or a retry of one already stored)."""

    ack: int
    duplicate: Literal[True] | msgspec.UnsetType = msgspec.UNSET


class WsErrorBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] | None
    status: Annotated[int, msgspec.Meta(description="what the HTTP route would answer")]
    retry_after: Annotated[int, msgspec.Meta(ge=1)] | msgspec.UnsetType = msgspec.UNSET


class WsError(msgspec.Struct, forbid_unknown_fields=True):
    """A WebSocket message refused; `seq` is null when it could not be read."""

    error: WsErrorBody
    seq: int | None


_TYPES = (
    PpgBatch,
    IngestAck,
    Error,
    AlertsPage,
    HealthStatus,
    HealthReport,
    HealthJsonStatus,
    HealthJson,
    WsAck,
    WsError,
)


# Python's end-of-string anchors, unescaped; ECMA-262 (JSON Schema's regex dialect) spells
# them ``^`` and ``$`` (which, without the multiline flag, match only at the very ends).
_PYTHON_ANCHORS = re.compile(r"(?<!\\)((?:\\\\)*)\\([AZ])")


def _ecma_pattern(pattern: str) -> str:
    return _PYTHON_ANCHORS.sub(lambda m: m.group(1) + ("^" if m.group(2) == "A" else "$"), pattern)


def ecma_patterns(node: Any) -> Any:
    """``node`` (a JSON Schema, or any part of one) with each ``pattern`` in JSON Schema's
    regex dialect: the service's patterns are Python's (``\\Z``, as ``$`` also matches
    before a final newline there), and msgspec's schemas carry them as they are. Whatever
    schema of the service's types is published goes through it."""
    if isinstance(node, dict):
        return {
            k: _ecma_pattern(v) if k == "pattern" and isinstance(v, str) else ecma_patterns(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [ecma_patterns(v) for v in node]
    return node


def _schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    batch = components["PpgBatch"]["properties"]
    # An ack echoes the batch: its seq and sample count have the batch's bounds, whatever
    # they are in shared/wire.py.
    ack = components["IngestAck"]["properties"]
    ack["seq"] = dict(batch["seq"])
    ppg = batch["ppg"]
    ack["accepted"] = {
        **ack["accepted"],
        **{k: ppg[v] for k, v in (("minimum", "minItems"), ("maximum", "maxItems")) if v in ppg},
    }
    components["WsAck"]["properties"]["ack"] = dict(batch["seq"])
    codes = ", ".join(f"{status}: `{code}`" for status, code in sorted(CODES.items()))
    components["ErrorBody"]["properties"]["code"]["description"] = f"by status: {codes}"
    return dict(sorted(components.items()))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


_RATE_LIMIT_HEADERS = (
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)


def _headers() -> dict[str, Any]:
    seconds = {"type": "integer", "minimum": 0}
    return {
        "Retry-After": {
            "description": "seconds to wait before trying again",
            "schema": {"type": "integer", "minimum": 1},
        },
        "WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}},
        "Accept-Encoding": {
            "description": "the content codings a body may have",
            "schema": {"type": "string", "const": ACCEPT_ENCODING},
        },
        "RateLimit-Policy": {
            "description": 'the policy\'s windows, e.g. `"default";q=1000;w=60`',
            "schema": {"type": "string"},
        },
        "RateLimit": {
            "description": 'the tightest window, e.g. `"default";r=998;t=1`',
            "schema": {"type": "string"},
        },
        "X-RateLimit-Limit": {"schema": {"type": "integer", "minimum": 1}},
        "X-RateLimit-Remaining": {"schema": seconds},
        "X-RateLimit-Reset": {"description": "seconds", "schema": seconds},
    }


def _json(schema: str) -> dict[str, Any]:
    return {_JSON: {"schema": _ref(schema)}}


def _error(description: str, *headers: str, required: bool = True) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json("Error")}
    if headers:
        response["headers"] = {
            name: {**_header(name), "required": True} if required else _header(name)
            for name in headers
        }
    return response


def _rate_limit_headers() -> dict[str, Any]:
    return {name: _header(name) for name in _RATE_LIMIT_HEADERS}


def _rate_limited(who: str) -> dict[str, Any]:
    return _error(
        f"over the rate limit of the {who} (`details`: policy and window)",
        "Retry-After",
        *_RATE_LIMIT_HEADERS,
    )


_UNAUTHORIZED = "no bearer token, or an unknown (or revoked) one"
_UNAVAILABLE = "cannot be served now: try again after `Retry-After` seconds"


def _ingest() -> dict[str, Any]:
    return {
        "post": {
            "operationId": "ingestPpg",
            "tags": ["ingestion"],
            "summary": "Store one batch of PPG samples",
            "description": (
                "`(device_id, seq)` is the idempotency key: a retried batch is acknowledged"
                " again and stored once. The answer comes only after the batch is stored."
            ),
            "security": [{"deviceToken": []}],
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": _ref("PpgBatch")}},
            },
            "responses": {
                "202": {
                    "description": "stored (or already stored: `duplicate`)",
                    "headers": _rate_limit_headers(),
                    "content": _json("IngestAck"),
                },
                "400": _error("the body is not JSON"),
                "401": _error(_UNAUTHORIZED, "WWW-Authenticate"),
                "403": _error("the token is not for the body's `device_id`"),
                "413": _error(
                    "the body exceeds `MAX_BODY_BYTES` (a `Content-Length` over it: at once)"
                ),
                "415": _error(
                    "`Content-Type` is not `application/json`, or `Content-Encoding` is"
                    " neither gzip nor deflate (then `Accept-Encoding` says which)",
                    "Accept-Encoding",
                    required=False,
                ),
                "422": _error("a field is invalid: `details.field` is its path, e.g. `ppg[3]`"),
                "429": _rate_limited("device (or, without a valid token, of the address)"),
                "503": _error(
                    f"not stored (Redis unavailable, backlog over its limit, shutting down):"
                    f" {_UNAVAILABLE}",
                    "Retry-After",
                ),
            },
        }
    }


def _ingest_ws() -> dict[str, Any]:
    return {
        "get": {
            "operationId": "ingestWebSocket",
            "tags": ["ingestion"],
            "summary": "Open a device's WebSocket (the upgrade endpoint)",
            "description": (
                "A WebSocket handshake (`Upgrade: websocket`) with the device's bearer token."
                " Each text message is one batch (the `PpgBatch` schema), answered with a"
                " `WsAck` or a `WsError` in the order received; the protocol, its limits and"
                " its close codes are in docs/websocket.md."
            ),
            "security": [{"deviceToken": []}],
            "responses": {
                "101": {"description": "switching protocols: the socket is open"},
                "400": _error("not a WebSocket handshake"),
                "401": _error(_UNAUTHORIZED, "WWW-Authenticate"),
                "429": _rate_limited("address (a handshake without a valid token)"),
                "503": _error(f"not accepting sockets now: {_UNAVAILABLE}", "Retry-After"),
            },
        }
    }


def _at_most(limit: int) -> str:
    """A regex for the decimal numbers 0 to ``limit``, as ASCII digits without a sign."""
    digits = str(limit)
    shorter = f"[0-9]{{1,{len(digits) - 1}}}" if len(digits) > 1 else None
    same_length = [
        f"{digits[:i]}[0-{int(digit) - 1}][0-9]{{{len(digits) - i - 1}}}"
        for i, digit in enumerate(digits)
        if digit != "0"
    ]
    return "|".join(filter(None, [shorter, *same_length, digits]))


# The last millisecond a datetime holds (9999-12-31T23:59:59.999Z), since the epoch.
_EPOCH_MS_MAX = (
    dt.datetime.max.replace(tzinfo=dt.UTC) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
) // dt.timedelta(milliseconds=1)
# Empty is the default.
_EPOCH_MS_PATTERN = f"^({_at_most(_EPOCH_MS_MAX)})?$"


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


def _alerts() -> dict[str, Any]:
    # Accepted spellings of ``open``, case-insensitive (service/alerts_api.py); empty is false.
    boolean = "|".join(
        "".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in word)
        for word in ("true", "false", "yes", "no", "1", "0")
    )
    return {
        "get": {
            "operationId": "listAlerts",
            "tags": ["alerts"],
            "summary": "The alerts, newest first",
            "security": [{"operatorToken": []}],
            "parameters": [
                _query(
                    "device_id",
                    "only this device's alerts (empty: every device)",
                    {"type": "string", "pattern": f"^$|{DEVICE_ID_PATTERN}"},
                ),
                _query(
                    "since",
                    "opened at or after: an RFC 3339 date-time or epoch milliseconds"
                    " (default: 24 hours ago)",
                    {
                        "anyOf": [
                            {"type": "string", "format": "date-time"},
                            {"type": "string", "pattern": _EPOCH_MS_PATTERN},
                        ]
                    },
                ),
                _query(
                    "open",
                    "`true`: only the open ones (also `1`, `yes`; any case)",
                    {"type": "string", "pattern": f"^({boolean})?$"},
                ),
                _query(
                    "limit",
                    "at most this many (default 100)",
                    {"type": "integer", "minimum": 1, "maximum": 1000},
                ),
            ],
            "responses": {
                "200": {
                    "description": "the alerts",
                    "headers": _rate_limit_headers(),
                    "content": _json("AlertsPage"),
                },
                "400": _error(_UNPARSABLE),
                "401": _error(_UNAUTHORIZED, "WWW-Authenticate"),
                "403": _error("a device's token, or the API is off (`ADMIN_TOKEN` unset)"),
                "422": _error("a parameter is invalid: `details.field` names it"),
                "429": _rate_limited("address"),
                "503": _error(f"Postgres unavailable: {_UNAVAILABLE}", "Retry-After"),
            },
        }
    }


# What any route may answer for a request the HTTP parser refuses before routing it.
_UNPARSABLE = "the request cannot be parsed (a malformed header, say): docs/protocol-limits.md"


def _probe(operation_id: str, summary: str) -> dict[str, Any]:
    # Anyone gets the verdict alone, the operator the report: one shape or the other.
    content = {
        _JSON: {"schema": {"oneOf": [_ref("HealthStatus"), _ref("HealthReport")]}},
        _HEALTH_JSON: {"schema": {"oneOf": [_ref("HealthJsonStatus"), _ref("HealthJson")]}},
    }
    return {
        "get": {
            "operationId": operation_id,
            "tags": ["health"],
            "summary": summary,
            "description": (
                "From cached results, never limited. `Accept: application/health+json` gets"
                " the IETF draft's format. Without the operator's token, the status alone"
                " (`HealthStatus`, `HealthJsonStatus`); with it, the checks too"
                " (`HealthReport`, `HealthJson`): docs/health.md."
            ),
            "security": [{}, {"healthToken": []}],
            "responses": {
                "200": {"description": "every check up", "content": content},
                "400": _error(_UNPARSABLE),
                "503": {"description": "a check down", "content": content},
            },
        }
    }


def _document() -> dict[str, Any]:
    return {
        "get": {
            "operationId": "getOpenApi",
            "tags": ["meta"],
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "the OpenAPI document",
                    "headers": _rate_limit_headers(),
                    "content": {_JSON: {"schema": {"type": "object"}}},
                },
                "429": _rate_limited("address"),
                "503": _error(f"rate limits cannot be checked: {_UNAVAILABLE}", "Retry-After"),
            },
        }
    }


def build_document() -> dict[str, Any]:
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "PulseCal ingestion service",
            "version": API_VERSION,
            "description": (
                "Wearable devices send PPG batches over HTTP or a WebSocket (docs/websocket.md)."
                ' Every refusal is `{"error": {"code", "message", "details"}}` with the'
                " status that says why; never a 500 for bad input. A request that cannot be"
                " parsed, or that no route takes (HTTP/0.9 or HTTP/2.0, CONNECT, a"
                " `Content-Encoding` other than gzip or deflate, an `Expect` other than"
                " 100-continue), is refused before any route, in the same shape (400, 408,"
                " 413, 414, 415, 417, 431: docs/protocol-limits.md). Generated by"
                " `python -m service.openapi`."
            ),
        },
        "tags": [
            {"name": "ingestion", "description": "devices, with their own tokens"},
            {"name": "alerts", "description": "operators, with `ADMIN_TOKEN`"},
            {"name": "health", "description": "Kubernetes probes, unauthenticated"},
            {"name": "meta"},
        ],
        "paths": {
            "/ingestion/ppg": _ingest(),
            "/ingestion/ws": _ingest_ws(),
            "/alerts": _alerts(),
            "/health": _probe("health", "Every dependency: database, redis, ai-services, ..."),
            "/health/liveness": _probe("liveness", "The process answers (no dependencies)"),
            "/health/readiness": _probe(
                "readiness", "Can take data now: Redis writable, tokens loaded, not draining"
            ),
            "/health/startup": _probe("startup", "Readiness held once since start"),
            OPENAPI_ROUTE: _document(),
        },
        "components": {
            "schemas": _schemas(),
            "headers": _headers(),
            "securitySchemes": {
                "deviceToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a device's token (`pulsecal-admin device add`)",
                },
                "operatorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the operators' token (`ADMIN_TOKEN`)",
                },
                "healthToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "shows health details: `HEALTH_DETAIL_TOKEN` (`METRICS_TOKEN` when unset)"
                    ),
                },
            },
        },
    }
    portable: dict[str, Any] = ecma_patterns(document)
    return portable


def document_bytes() -> bytes:
    """The document as committed: indented JSON, one trailing newline."""
    return msgspec.json.format(msgspec.json.encode(build_document()), indent=2) + b"\n"


def openapi_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /openapi.json``: the document, encoded once here."""
    body = document_bytes()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=_JSON)

    return openapi


def main() -> None:
    sys.stdout.buffer.write(document_bytes())


if __name__ == "__main__":
    main()
