"""The health dashboard at ``/``: server-rendered HTML and SVG, refreshed by a small script.

``/`` is the whole page; ``/dashboard/live`` is the part that changes, which the page's
script fetches every few seconds and swaps in (no reload, nothing loaded from elsewhere).
Charts are SVG paths computed here from the aggregator's 10-second window.

Both are the operator's (``shared/access.py``): without the operator token (as a bearer
token, or as the cookie ``/signin`` sets from a form) ``/`` answers 401 with the sign-in
form, ``/dashboard/live`` a bare 401; with no token configured, only
``ENVIRONMENT=development`` shows them (403 otherwise).
"""

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from shared.access import COOKIE, cookie_value, is_operator, operator_token, token_matches
from shared.appkeys import CHECKER
from shared.health import CheckResult
from shared.telemetry import ServiceHeartbeat, WorkerHeartbeat
from shared.version import build_version

from .aggregate import WINDOW_SECONDS, Aggregator, WindowPoint
from .appkeys import CONSUMER, HEARTBEAT, SETTINGS
from .health import as_service
from .metrics import partition_order

__all__ = (
    "Chart",
    "Component",
    "dashboard",
    "dashboard_live",
    "live_context",
    "partitions_line",
    "sign_in",
)

REFRESH_SECONDS = 3
_RECENT_BUCKETS = 6  # the headline figures: the last minute
_CHART_W = 300
_CHART_H = 64

# The order an on-call engineer reads them in: the pod's own process first.
_LABELS = {
    "service": "Service (heartbeat)",
    "redis": "Redis",
    "database": "Postgres",
    "ai-services": "AI service",
    "memory_heap": "Memory: heap",
    "memory_rss": "Memory: RSS",
    "disk": "Disk (LOG_DIR)",
}


@dataclass(frozen=True, slots=True)
class Component:
    key: str
    label: str
    state: str  # "up", "down" or "pending"
    message: str | None
    details: list[tuple[str, str]]
    checked: str  # "3 s ago"
    checked_at: str  # ISO time, for the tooltip
    duration_ms: float


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    value: str  # the latest figure, formatted
    peak: str  # the top of the y axis, formatted
    line: str  # SVG path data
    area: str
    tone: str  # "ok", "warn" or "bad": the colour of the latest figure
    empty: bool
    span: str


def _ago(seconds: float) -> str:
    if seconds < 1:
        return "just now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _detail_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _component(key: str, result: CheckResult, now: float) -> Component:
    pending = result.checked_at <= 0
    return Component(
        key=key,
        label=_LABELS.get(key, key),
        state="pending" if pending else ("up" if result.up else "down"),
        message=result.error,
        details=[(k, _detail_value(v)) for k, v in result.details.items()],
        checked="not yet" if pending else _ago(now - result.checked_at),
        checked_at=""
        if pending
        else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(result.checked_at)),
        duration_ms=round(result.duration_ms, 1),
    )


def _chart(
    title: str,
    points: Sequence[WindowPoint],
    value_of: Callable[[WindowPoint], float | None],
    fmt: Callable[[float], str],
    tone_of: Callable[[float], str],
) -> Chart:
    values = [value_of(p) for p in points]
    known = [v for v in values if v is not None]
    span = f"last {len(points) * WINDOW_SECONDS // 60} min"
    if not known:
        return Chart(title, "no data", "", "", "", "ok", True, span)
    peak = max(known) or 1.0
    step = _CHART_W / max(1, len(values) - 1)
    line: list[str] = []
    area: list[str] = []
    run: list[tuple[float, float]] = []

    def close_run() -> None:
        if not run:
            return
        line.append("M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in run))
        area.append(
            f"M{run[0][0]:.1f},{_CHART_H} "
            + " ".join(f"L{x:.1f},{y:.1f}" for x, y in run)
            + f" L{run[-1][0]:.1f},{_CHART_H} Z"
        )
        run.clear()

    for i, v in enumerate(values):
        if v is None:
            close_run()
            continue
        run.append((i * step, _CHART_H - 2 - (v / peak) * (_CHART_H - 6)))
    close_run()
    latest = next((v for v in reversed(values) if v is not None), 0.0)
    return Chart(
        title, fmt(latest), fmt(peak), " ".join(line), " ".join(area), tone_of(latest), False, span
    )


def _rate(p: WindowPoint) -> float:
    return p.requests / WINDOW_SECONDS


def _error_share(p: WindowPoint) -> float | None:
    return None if not p.requests else 100 * p.errors_5xx / p.requests


def _p95_ms(p: WindowPoint) -> float | None:
    return None if p.p95_s is None else p.p95_s * 1000


def _charts(points: Sequence[WindowPoint]) -> list[Chart]:
    return [
        _chart("HTTP requests / s", points, _rate, lambda v: f"{v:,.1f}", lambda _: "ok"),
        _chart(
            "Server errors (5xx) %",
            points,
            _error_share,
            lambda v: f"{v:.2f} %",
            lambda v: "bad" if v >= 5 else ("warn" if v > 0 else "ok"),
        ),
        _chart(
            "p95 latency",
            points,
            _p95_ms,
            lambda v: f"{v:,.1f} ms" if v >= 1 else f"{v * 1000:,.0f} µs",
            lambda v: "bad" if v >= 1000 else ("warn" if v >= 100 else "ok"),
        ),
        _chart(
            "WebSocket messages / s",
            points,
            lambda p: p.ws_messages / WINDOW_SECONDS,
            lambda v: f"{v:,.1f}",
            lambda _: "ok",
        ),
    ]


def _recent(points: Sequence[WindowPoint]) -> dict[str, str]:
    recent = points[-_RECENT_BUCKETS:]
    seconds = len(recent) * WINDOW_SECONDS
    requests = sum(p.requests for p in recent)
    e4, e5 = sum(p.errors_4xx for p in recent), sum(p.errors_5xx for p in recent)
    p95 = [p.p95_s for p in recent if p.p95_s is not None]
    return {
        "rate": f"{requests / seconds:,.1f} req/s",
        "errors": f"{100 * e5 / requests:.2f} % 5xx · {100 * e4 / requests:.2f} % 4xx"
        if requests
        else "no requests",
        "p95": f"{max(p95) * 1000:,.2f} ms (worst 10 s)" if p95 else "n/a",
    }


def live_context(app: web.Application) -> dict[str, Any]:
    """Everything the live part of the page shows, as plain values."""
    settings = app[SETTINGS]
    now = time.time()
    results: Mapping[str, CheckResult] = app[CHECKER].results
    components = [_component(key, results[key], now) for key in _LABELS if key in results]
    down = [c for c in components if c.state == "down"]
    consumer = app.get(CONSUMER)
    aggregator: Aggregator | None = None if consumer is None else consumer.aggregator
    redis_result = results.get("redis")
    redis_down = (
        redis_result is not None and redis_result.checked_at > 0 and not redis_result.up
    ) or (consumer is not None and consumer.error is not None)
    fresh = app[HEARTBEAT].fresh(now)
    heartbeat = None if fresh is None else as_service(fresh)
    points = [] if aggregator is None else aggregator.window_points(now)
    telemetry: dict[str, str] = {}
    if consumer is not None and aggregator is not None:
        telemetry = {
            "records": f"{aggregator.records:,}",
            "lag": f"{consumer.lag_s:.1f} s",
            "backlog": f"{consumer.backlog:,} entries",
            "dropped": f"{aggregator.dropped_total:,}",
            "gap": f"{aggregator.gap_entries:,} entries",
            "last read": _ago(now - consumer.last_read_at) if consumer.last_read_at else "never",
        }
    service: dict[str, str] = {}
    if heartbeat is not None:
        service = {
            "WebSocket connections": f"{heartbeat.ws_connections:,}",
            "HTTP connections": f"{heartbeat.http_connections:,}"
            if heartbeat.http_connections >= 0
            else "n/a",
            "readings backlog": f"{heartbeat.backlog:,} batches"
            + (" (over the limit: 503s)" if heartbeat.backlog_exceeded else ""),
            "pending writes": f"{heartbeat.pending_writes:,}",
            "acks": _acks(heartbeat),
            "event loop lag": f"{heartbeat.loop_lag_ms:.1f} ms",
            "RSS": f"{heartbeat.rss_bytes / 1048576:,.0f} MB",
        }
    if isinstance(fresh, WorkerHeartbeat) and fresh.partition_backlog:
        service["partitions"] = partitions_line(fresh.partition_backlog)
    return {
        "pod": settings.pod,
        "version": build_version(),
        "now": time.strftime("%H:%M:%S", time.localtime(now)),
        "overall": "down"
        if down
        else ("pending" if any(c.state == "pending" for c in components) else "up"),
        "down_count": len(down),
        "components": components,
        "redis_down": redis_down,
        "redis_error": (consumer.error if consumer is not None and consumer.error else None)
        or (redis_result.error if redis_result is not None else None),
        "last_read": _ago(now - consumer.last_read_at)
        if consumer is not None and consumer.last_read_at
        else "never",
        "metrics_enabled": consumer is not None,
        "loaded": aggregator is not None,
        "charts": _charts(points) if points else [],
        "recent": _recent(points) if points else {},
        "telemetry": telemetry,
        "service": service,
        "refresh_seconds": REFRESH_SECONDS,
    }


def partitions_line(backlog: Mapping[str, int]) -> str:
    """How many readings partitions the worker measures, the largest backlog and where:
    ``12 · largest backlog 4,500 entries on 3/12``."""
    count = f"{len(backlog):,}"
    name, largest = max(sorted(backlog.items(), key=partition_order), key=lambda item: item[1])
    if largest <= 0:
        return f"{count} · no backlog"
    return f"{count} · largest backlog {largest:,} entries on {name}"


def _acks(heartbeat: ServiceHeartbeat) -> str:
    """What an ack means, and what Redis's replication allows now."""
    replicas = (
        f"{heartbeat.redis_replicas_online} replica(s) online,"
        f" lag {heartbeat.redis_replication_lag_seconds} s"
    )
    if heartbeat.ack_replicas:
        return f"replicated to {heartbeat.ack_replicas} ({replicas})"
    return f"the primary's ({heartbeat.redis_role}; {replicas})"


def _sign_in_page(request: web.Request, *, wrong: bool = False) -> web.Response:
    """401 with the sign-in form, or 403 saying a token must be configured first."""
    configured = operator_token(request.app[SETTINGS]) is not None
    response = aiohttp_jinja2.render_template(
        "signin.html",
        request,
        {"configured": configured, "wrong": wrong},
        status=401 if configured else 403,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@aiohttp_jinja2.template("index.html")
async def dashboard(request: web.Request) -> dict[str, Any] | web.StreamResponse:
    if not is_operator(request, request.app[SETTINGS]):
        return _sign_in_page(request)
    return live_context(request.app)


async def dashboard_live(request: web.Request) -> web.Response:
    if not is_operator(request, request.app[SETTINGS]):
        return web.Response(
            status=401, text="sign in again\n", headers={"Cache-Control": "no-store"}
        )
    response = aiohttp_jinja2.render_template("live.html", request, live_context(request.app))
    response.headers["Cache-Control"] = "no-store"
    return response


async def sign_in(request: web.Request) -> web.StreamResponse:
    """``POST /signin``: the operator token from the form; right, a session cookie derived
    from it (HttpOnly, SameSite=Strict) and back to ``/``; wrong, the form again."""
    token = operator_token(request.app[SETTINGS])
    if token is None:
        return _sign_in_page(request)
    form = await request.post()
    given = form.get("token")
    if not isinstance(given, str) or not token_matches(given.strip(), token):
        return _sign_in_page(request, wrong=True)
    response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="Strict", path="/")
    return response
