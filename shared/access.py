"""Who sees what: anyone gets a probe's status, the operator gets its details.

A health report's details name hosts and ports, pids, versions, paths, memory and token
counts: worth something to an attacker, needed by nobody but the operator. So the probes
and ``/health`` answer everyone with their status alone (``{"status": "ok"}`` or
``"error"``, ``"pass"`` or ``"fail"`` in ``application/health+json``, with 200 or 503),
and the full report only to the operator: whoever presents the operator token,
``HEALTH_DETAIL_TOKEN`` (``METRICS_TOKEN`` when that is unset), as ``Authorization: Bearer
<token>`` or, in a browser, as the cookie the sidecar's sign-in form sets. With no token
configured at all, details are shown only when ``ENVIRONMENT`` is ``development``
(docs/health.md).
"""

import hashlib
import hmac
from collections.abc import Mapping

import msgspec
from aiohttp import web

from .health import HEALTH_JSON, CheckResult, health_response
from .settings import OperatorSection

__all__ = (
    "COOKIE",
    "cookie_value",
    "health_reply",
    "is_operator",
    "operator_token",
    "token_matches",
)

COOKIE = "pulsecal_operator"
DEVELOPMENT = "development"


def operator_token(settings: OperatorSection) -> str | None:
    return settings.health_detail_token or settings.metrics_token


def _bytes(text: str) -> bytes:
    # Header bytes that are not UTF-8 reach us as lone surrogates: encode any str.
    return text.encode("utf-8", "surrogatepass")


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(_bytes(given), _bytes(token))


def cookie_value(token: str) -> str:
    """What the sign-in cookie holds: derived from the token, never the token itself (it
    would open ``/metrics`` too)."""
    return hmac.new(_bytes(token), b"pulsecal operator cookie", hashlib.sha256).hexdigest()


def is_operator(request: web.BaseRequest, settings: OperatorSection) -> bool:
    token = operator_token(settings)
    if token is None:
        return settings.environment.strip().lower() == DEVELOPMENT
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token_matches(given.strip(), token):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and token_matches(cookie, cookie_value(token))


def health_reply(
    request: web.Request,
    results: Mapping[str, CheckResult],
    *,
    settings: OperatorSection,
    service_id: str,
) -> web.Response:
    """``results`` in full for the operator, their verdict alone for anyone else."""
    if is_operator(request, settings):
        return health_response(request, results, service_id=service_id)
    up = all(r.up for r in results.values())
    status = 200 if up else 503
    if HEALTH_JSON in request.headers.get("Accept", ""):
        body = msgspec.json.encode({"status": "pass" if up else "fail"})
        return web.Response(status=status, body=body, content_type=HEALTH_JSON)
    body = msgspec.json.encode({"status": "ok" if up else "error"})
    return web.Response(status=status, body=body, content_type="application/json")
