"""``GET /alerts?device_id=&since=&open=&limit=``: the operators' view of the alerts.

Behind the operator token (``ADMIN_TOKEN``, ``Authorization: Bearer <token>``): no token or
an unknown one is 401; a device's token (valid, but not an operator's) is 403, and so is
every request while ``ADMIN_TOKEN`` is unset (the API is off). Newest first; ``since`` is ISO
8601 or epoch milliseconds (default: 24 hours ago), ``open=true`` keeps the open ones only,
``limit`` is 1..1000 (100). Postgres unavailable: 503 with ``Retry-After``.

Whatever a client sends is answered in the JSON error shape: any ``Authorization`` bytes
(401/403), any query value (422 naming the parameter).
"""

import asyncio
import datetime as dt
import hmac
import re

import msgspec
import psycopg
from aiohttp import web

from shared.alerts import list_alerts
from shared.appkeys import PG_POOL
from shared.errors import error_response
from shared.wire import DEVICE_ID_PATTERN

from .appkeys import INGEST, SETTINGS

__all__ = ("ALERTS_ROUTE", "get_alerts")

ALERTS_ROUTE = "/alerts"
_BEARER = "Bearer "
_DEFAULT_SINCE = dt.timedelta(hours=24)
_MAX_LIMIT = 1000
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
# Epoch milliseconds of 9999-12-31, the last day a datetime holds, have 15 digits.
_MAX_EPOCH_MS_DIGITS = 15


class _BadParameterError(ValueError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _ascii_digits(raw: str, max_digits: int) -> int | None:
    """``raw`` as a non-negative integer if it is 1 to ``max_digits`` ASCII digits.

    ``str.isdigit`` alone also passes "²" (which ``int`` refuses) and "٣" (which it reads),
    and ``int`` refuses more than 4300 digits: the length and the alphabet are checked first.
    """
    if 0 < len(raw) <= max_digits and raw.isascii() and raw.isdigit():
        return int(raw)
    return None


def _since(raw: str | None) -> dt.datetime:
    if raw is None or raw == "":
        return dt.datetime.now(dt.UTC) - _DEFAULT_SINCE
    try:
        if raw.isdigit():
            epoch_ms = _ascii_digits(raw, _MAX_EPOCH_MS_DIGITS)
            if epoch_ms is None:
                raise ValueError("not epoch milliseconds")
            return dt.datetime.fromtimestamp(epoch_ms / 1000, tz=dt.UTC)
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError) as e:
        raise _BadParameterError("since", "expected ISO 8601 or epoch milliseconds") from e
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _limit(raw: str | None) -> int:
    if raw is None:
        return 100
    limit = _ascii_digits(raw, len(str(_MAX_LIMIT)))
    if limit is None or not 1 <= limit <= _MAX_LIMIT:
        raise _BadParameterError("limit", f"expected an integer in [1, {_MAX_LIMIT}]")
    return limit


def _open_only(raw: str | None) -> bool:
    if raw is None or raw.lower() in ("", "false", "0", "no"):
        return False
    if raw.lower() in ("true", "1", "yes"):
        return True
    raise _BadParameterError("open", "expected true or false")


def _device_id(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if _DEVICE_ID.fullmatch(raw) is None:
        raise _BadParameterError("device_id", "not a valid device id")
    return raw


def _as_sent(text: str) -> bytes:
    """``text`` as bytes, whatever it holds: aiohttp (and Python, for the environment) keep
    bytes that are not UTF-8 as lone surrogates, which a plain ``encode()`` refuses."""
    return text.encode("utf-8", "surrogatepass")


def _refusal(request: web.Request) -> web.Response | None:
    token = request.app[SETTINGS].admin_token
    header = request.headers.get("Authorization")
    if header is None or not header.startswith(_BEARER):
        return error_response(
            401, "an operator token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    if token is None:
        return error_response(403, "the operator API is off (ADMIN_TOKEN is not set)")
    if hmac.compare_digest(_as_sent(header[len(_BEARER) :].strip()), _as_sent(token)):
        return None
    if request.app[INGEST].tokens.authenticate(header) is not None:
        return error_response(403, "a device token cannot read alerts")
    return error_response(
        401, "the operator token is not valid", headers={"WWW-Authenticate": "Bearer"}
    )


async def get_alerts(request: web.Request) -> web.Response:
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    query = request.query
    try:
        since = _since(query.get("since"))
        device_id = _device_id(query.get("device_id"))
        open_only = _open_only(query.get("open"))
        limit = _limit(query.get("limit"))
    except _BadParameterError as e:
        return error_response(422, f"invalid parameter {e.name}: {e}", {"field": e.name})
    settings = request.app[SETTINGS]
    try:
        async with (
            asyncio.timeout(settings.health_check_timeout_ms / 1000),
            request.app[PG_POOL].connection() as conn,
        ):
            alerts = await list_alerts(
                conn, since=since, device_id=device_id, open_only=open_only, limit=limit
            )
    except (psycopg.Error, OSError, TimeoutError):
        return error_response(
            503,
            "alerts cannot be read now",
            headers={"Retry-After": str(settings.retry_after)},
        )
    body = {"alerts": alerts, "count": len(alerts), "since": since.isoformat()}
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")
