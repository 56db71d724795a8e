"""What the service's readiness and startup probes check (``shared/runtime/probes.py``
answers them): Redis takes the writes, it is a primary with the replicas acks wait for
(``service/replication.py``), the device tokens are loaded; readiness also fails while the
service drains (``ingestion``)."""

from collections.abc import Callable

from shared.health import CheckResult, HealthChecker, now_result

from .state import IngestState

__all__ = ("REPLICATION_CHECK", "SERVICE_ID", "SERVING_CHECK", "readiness_checks")

# The serviceId of the health reports.
SERVICE_ID = "pulsecal-api"
SERVING_CHECK = "ingestion"
REPLICATION_CHECK = "redis-replication"


def readiness_checks(
    state: IngestState, checker: HealthChecker
) -> Callable[[], dict[str, CheckResult]]:
    def results() -> dict[str, CheckResult]:
        redis = checker.results["redis"]
        writer = state.writer
        # A failed write makes the pod unready at once; a later successful write or ping
        # (the checker re-checks every second while something is down) makes it ready again.
        redis_ok = redis.up and (writer.healthy or redis.checked_at > writer.last_failure)
        return {
            "redis": redis
            if redis_ok == redis.up
            else now_result(
                False, "the last write to Redis failed", partitionsFailing=writer.failing
            ),
            REPLICATION_CHECK: checker.results[REPLICATION_CHECK],
            "device_tokens": now_result(
                state.tokens.loaded,
                None if state.tokens.loaded else "not loaded yet",
                tokens=len(state.tokens),
            ),
        }

    return results
