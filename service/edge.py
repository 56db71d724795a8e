"""What every route does around its handler: time it for telemetry, answer errors as JSON.

Handlers are wrapped where they are registered rather than through an aiohttp middleware:
any middleware makes aiohttp add two more layers to every request (its cached handler
chain and a current-app fix-up), which the ingest path measurably pays for.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from shared.appkeys import TRACING
from shared.errors import CLIENT_CLOSED, error_response, fault_response, hung_up
from shared.telemetry import http_record
from shared.tracing import TRACEPARENT

from .appkeys import INGEST
from .ratelimit import Policy, check_client

__all__ = ("UNMATCHED", "count_hang_up", "instrumented", "not_found")

UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def instrumented(
    route: str, handler: Handler, *, policy: Policy | None = None, traced: bool = True
) -> Handler:
    """``handler`` timed and recorded under ``route``, its refusals in the JSON error shape,
    behind ``policy``'s rate limit per client IP (no policy: never limited), and traced when
    sampled (``traced``)."""

    limited = handler if policy is None else _rate_limited(route, handler, policy)

    async def instrumented_handler(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        tracing = request.app[TRACING]
        trace_id = None
        try:
            if traced and tracing.decide(request.headers.get(TRACEPARENT)):
                response, trace_id = await tracing.serve(request, limited)
            else:
                response = await limited(request)
        except web.HTTPException as e:
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            response = error_response(e.status, e.reason, headers=headers)
        except Exception as e:  # noqa: BLE001 - the edge answers and logs; it never crashes
            response = fault_response(request, route, e)
        except asyncio.CancelledError:
            count_hang_up(request, route, started)
            raise
        method = request.method
        request.app[INGEST].telemetry.record(
            http_record(
                route,
                method if method in _METHODS else "OTHER",
                response.status,
                int((time.perf_counter() - started) * 1e6),
                request.content_length or 0,
                0,
                trace_id,
            )
        )
        return response

    return instrumented_handler


def count_hang_up(request: web.Request, route: str, started: float) -> None:
    """Record a request whose handler is being cancelled, if its client hung up (aiohttp
    cancels the handler then when run with ``handler_cancellation``)."""
    if not hung_up(request):
        return
    method = request.method
    request.app[INGEST].telemetry.record(
        http_record(
            route,
            method if method in _METHODS else "OTHER",
            CLIENT_CLOSED,
            int((time.perf_counter() - started) * 1e6),
            request.content_length or 0,
        )
    )


def _rate_limited(route: str, handler: Handler, policy: Policy) -> Handler:
    """``handler`` behind ``policy``, per client IP, its headers on the answer."""

    async def rate_limited(request: web.Request) -> web.StreamResponse:
        gate = await check_client(request.app[INGEST], request, route, policy)
        if not isinstance(gate, dict):
            return gate
        response = await handler(request)
        if not response.prepared:
            response.headers.update(gate)
        return response

    return rate_limited


async def not_found(request: web.Request) -> web.StreamResponse:
    """The catch-all route: 405 (with ``Allow``) for a known path, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    if allowed:
        return error_response(
            405, "Method Not Allowed", headers={"Allow": ",".join(sorted(allowed))}
        )
    return error_response(404, "Not Found")
