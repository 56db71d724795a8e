"""Kubernetes probes and the full health report, all served from cached results.

Anyone gets each probe's status; the operator its details (``shared/access.py``).
"""

import os
import time

from aiohttp import web

from shared.access import health_reply
from shared.appkeys import CHECKER
from shared.health import CheckResult, now_result, startup_results

from .appkeys import INGEST, SETTINGS

__all__ = ("health", "liveness", "readiness", "startup")

_SERVICE_ID = "pulsecal-api"


def _respond(request: web.Request, results: dict[str, CheckResult]) -> web.Response:
    return health_reply(request, results, settings=request.app[SETTINGS], service_id=_SERVICE_ID)


async def liveness(request: web.Request) -> web.Response:
    """The process answers: nothing else (a dependency outage must not restart the pod)."""
    state = request.app[INGEST]
    uptime = (time.time_ns() // 1_000_000 - state.started_ms) / 1000
    return _respond(request, {"process": now_result(True, pid=os.getpid(), uptime_s=uptime)})


def _readiness_results(request: web.Request) -> dict[str, CheckResult]:
    state = request.app[INGEST]
    redis = request.app[CHECKER].results["redis"]
    writer = state.writer
    # A failed write makes the pod unready at once; a later successful write or ping
    # (the checker re-checks every second while something is down) makes it ready again.
    redis_ok = redis.up and (writer.healthy or redis.checked_at > writer.last_failure)
    return {
        "redis": redis
        if redis_ok == redis.up
        else now_result(False, "the last write to Redis failed"),
        "device_tokens": now_result(
            state.tokens.loaded,
            None if state.tokens.loaded else "not loaded yet",
            tokens=len(state.tokens),
        ),
        "ingestion": now_result(not state.draining, "shutting down" if state.draining else None),
    }


async def readiness(request: web.Request) -> web.Response:
    return _respond(request, _readiness_results(request))


async def startup(request: web.Request) -> web.Response:
    state = request.app[INGEST]
    results = _readiness_results(request)
    del results["ingestion"]
    state.started, results = startup_results(results, started=state.started)
    return _respond(request, results)


async def health(request: web.Request) -> web.Response:
    return _respond(request, dict(request.app[CHECKER].results))
