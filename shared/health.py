"""Cached dependency checks and the two response shapes they are served in.

Checks run in a background task, each bounded by a timeout; probes only read the cache.
The default shape is the original system's (``status/info/error/details``); a client that
asks for ``application/health+json`` gets the IETF draft format.
"""

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import ClientSession, web
from redis.asyncio import RedisCluster

from .redisclient import RedisClient
from .version import build_version

__all__ = (
    "HEALTH_JSON",
    "Check",
    "CheckFailedError",
    "CheckResult",
    "HealthChecker",
    "ai_services_check",
    "disk_check",
    "health_response",
    "now_result",
    "redis_check",
    "render_health",
    "startup_results",
    "threshold_check",
)

HEALTH_JSON = "application/health+json"

Check = Callable[[], Awaitable[Mapping[str, Any] | None]]


class CheckFailedError(Exception):
    """A check's way of saying "down", with the reason as its message."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    up: bool
    checked_at: float  # wall clock, seconds
    duration_ms: float
    details: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_seed(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "up" if self.up else "down", **self.details}
        if self.error is not None:
            out["message"] = self.error
        return out


_NOT_YET = CheckResult(up=False, checked_at=0.0, duration_ms=0.0, error="not checked yet")


class HealthChecker:
    def __init__(
        self,
        checks: Mapping[str, Check],
        *,
        timeout: float,
        interval: float,
        static_details: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._checks = dict(checks)
        self._timeout = timeout
        self._interval = interval
        self._static = static_details or {}
        self.results: dict[str, CheckResult] = {name: _NOT_YET for name in self._checks}
        self.rounds = 0

    async def _run_one(self, name: str, check: Check) -> CheckResult:
        started = time.perf_counter()
        details: Mapping[str, Any] = self._static.get(name, {})
        try:
            async with asyncio.timeout(self._timeout):
                extra = await check()
        except TimeoutError:
            error: str | None = f"timed out after {self._timeout * 1000:.0f} ms"
        except CheckFailedError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - any failure of a dependency check means "down"
            error = f"{type(e).__name__}: {e}".rstrip(": ")
        else:
            error = None
            if extra:
                details = {**details, **extra}
        return CheckResult(
            up=error is None,
            checked_at=time.time(),
            duration_ms=(time.perf_counter() - started) * 1000,
            details=details,
            error=error,
        )

    async def run_once(self) -> None:
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_one(n, self._checks[n]) for n in names))
        self.results = dict(zip(names, results, strict=True))
        self.rounds += 1

    async def run(self) -> None:
        while True:
            await self.run_once()
            healthy = all(r.up for r in self.results.values())
            # Re-check quickly while something is down, so recovery is seen soon.
            await asyncio.sleep(self._interval if healthy else min(self._interval, 1.0))


def threshold_check(measure: Callable[[], int], threshold: int, unit: str) -> Check:
    async def check() -> Mapping[str, Any]:
        used = measure()
        if used > threshold:
            raise CheckFailedError(f"{used} {unit} used exceeds the threshold of {threshold}")
        return {"used": used, "threshold": threshold}

    return check


def redis_check(redis: RedisClient) -> Check:
    """Redis answers. On a cluster, each primary is asked on its own: the check holds while
    any answers (one shard down is that shard's partitions refused, not the whole process
    unready) and says how many do."""

    async def check() -> Mapping[str, Any] | None:
        if not isinstance(redis, RedisCluster):
            await redis.ping()
            return None
        primaries = redis.get_primaries()
        if not primaries:  # a client that has not read the slot map yet
            await redis.initialize()
            primaries = redis.get_primaries()
        answers = await asyncio.gather(
            *(redis.ping(target_nodes=node) for node in primaries), return_exceptions=True
        )
        up = sum(1 for answer in answers if not isinstance(answer, BaseException))
        if not up:
            raise CheckFailedError(f"none of the {len(primaries)} primaries answers")
        return {"primariesUp": up, "primaries": len(primaries)}

    return check


def ai_services_check(url: str | None, session: ClientSession) -> Check:
    """The AI service's own ``/health`` answers 2xx; up but "not configured" without a URL."""

    async def check() -> Mapping[str, Any]:
        if url is None:
            return {"configured": False}
        async with session.get(url.rstrip("/") + "/health") as response:
            response.raise_for_status()
        return {}

    return check


def disk_check(path: str, threshold_percent: float) -> Check:
    # The directory may not exist (yet): measure the file system it would be on.
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)

    async def check() -> Mapping[str, Any]:
        usage = shutil.disk_usage(existing)
        used = usage.used / usage.total if usage.total else 0.0
        if used > threshold_percent:
            raise CheckFailedError(
                f"{used:.1%} of the disk at {path} used, threshold {threshold_percent:.0%}"
            )
        return {"path": path, "used_percent": round(used * 100, 1), "free_bytes": usage.free}

    return check


def render_health(
    results: Mapping[str, CheckResult],
    *,
    accept: str,
    version: str,
    service_id: str,
) -> tuple[int, bytes, str]:
    """(status code, body, content type) for a set of results; 503 when any is down."""
    up = all(r.up for r in results.values())
    status = 200 if up else 503
    if HEALTH_JSON in accept:
        checks = {
            f"{name}:status": [
                {
                    "status": "pass" if r.up else "fail",
                    "time": _iso(r.checked_at),
                    "observedValue": round(r.duration_ms, 3),
                    "observedUnit": "ms",
                    **({"output": r.error} if r.error else {}),
                }
            ]
            for name, r in results.items()
        }
        body: dict[str, Any] = {
            "status": "pass" if up else "fail",
            "version": version.split(".")[0],
            "releaseId": version,
            "serviceId": service_id,
            "checks": checks,
        }
        return status, msgspec.json.encode(body), HEALTH_JSON
    details = {name: r.as_seed() for name, r in results.items()}
    body = {
        "status": "ok" if up else "error",
        "info": {n: d for n, d in details.items() if results[n].up},
        "error": {n: d for n, d in details.items() if not results[n].up},
        "details": details,
    }
    return status, msgspec.json.encode(body), "application/json"


def _iso(epoch: float) -> str:
    if epoch <= 0:
        return "1970-01-01T00:00:00Z"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def health_response(
    request: web.Request, results: Mapping[str, CheckResult], *, service_id: str
) -> web.Response:
    """``results`` answered in the seed's shape, or ``application/health+json`` if asked."""
    status, body, content_type = render_health(
        results,
        accept=request.headers.get("Accept", ""),
        version=build_version(),
        service_id=service_id,
    )
    return web.Response(status=status, body=body, content_type=content_type)


def now_result(up: bool, error: str | None = None, **details: object) -> CheckResult:
    """A result known right now, without running a check (probe state, process facts)."""
    return CheckResult(up=up, checked_at=time.time(), duration_ms=0.0, details=details, error=error)


def startup_results(
    results: Mapping[str, CheckResult], *, started: bool
) -> tuple[bool, dict[str, CheckResult]]:
    """(started, what the startup probe answers). Startup only has to succeed once: from
    then on it answers up, and the readiness probe takes over."""
    started = started or all(r.up for r in results.values())
    return started, ({name: now_result(True) for name in results} if started else dict(results))
