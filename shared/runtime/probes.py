"""The Kubernetes probes every program answers, from state its cleanup context keeps current.

- ``/health/liveness``: the process answers, nothing else (a dependency outage must not
  restart the pod).
- ``/health/readiness``: the program's own conditions (``ready``), then whether it still
  takes work (``serving``: down once it drains).
- ``/health/startup``: the program's conditions until they have all held once; from then on
  it passes and readiness takes over.
- ``/health``: the background checker's last results, each bounded by
  ``HEALTH_CHECK_TIMEOUT``.

A program with no conditions of its own answers readiness and startup as liveness, and
``/health`` too when it has no checker. Anyone gets each probe's status; the operator its
details (``shared/access.py``).
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from shared.access import health_reply
from shared.health import CheckResult, HealthChecker, now_result, startup_results
from shared.settings import OperatorSection

__all__ = ("Probes",)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _never() -> bool:
    return False


@dataclass(slots=True, eq=False, kw_only=True)
class Probes:
    """Made with the app (its routes are the handlers here); the program's cleanup context
    fills in ``ready``, ``draining`` and ``checker`` once it has what they read."""

    settings: OperatorSection
    # The health report's serviceId.
    service_id: str
    # When the process started, for the uptime (and the heartbeat's ``started_ms``).
    started_ms: int = field(default_factory=_now_ms)
    ready: Callable[[], dict[str, CheckResult]] | None = None
    # The readiness check that fails while the program drains.
    serving: str = "serving"
    draining: Callable[[], bool] = _never
    checker: HealthChecker | None = None
    # Whether the startup probe has passed once.
    started: bool = False

    def routes(self) -> tuple[tuple[str, Handler], ...]:
        return (
            ("/health/liveness", self.liveness),
            ("/health/readiness", self.readiness),
            ("/health/startup", self.startup),
            ("/health", self.health),
        )

    def _reply(self, request: web.Request, results: dict[str, CheckResult]) -> web.Response:
        return health_reply(request, results, settings=self.settings, service_id=self.service_id)

    def _process(self) -> dict[str, CheckResult]:
        uptime = (_now_ms() - self.started_ms) / 1000
        return {"process": now_result(True, pid=os.getpid(), uptime_s=uptime)}

    async def liveness(self, request: web.Request) -> web.Response:
        return self._reply(request, self._process())

    async def readiness(self, request: web.Request) -> web.Response:
        if self.ready is None:
            return self._reply(request, self._process())
        results = self.ready()
        draining = self.draining()
        results[self.serving] = now_result(not draining, "shutting down" if draining else None)
        return self._reply(request, results)

    async def startup(self, request: web.Request) -> web.Response:
        if self.ready is None:
            return self._reply(request, self._process())
        self.started, results = startup_results(self.ready(), started=self.started)
        return self._reply(request, results)

    async def health(self, request: web.Request) -> web.Response:
        if self.checker is None:
            return self._reply(request, self._process())
        return self._reply(request, dict(self.checker.results))
