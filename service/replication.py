"""What an ack promises, and whether Redis can keep that promise now.

With ``ACK_MODE=primary`` a batch is acknowledged once the Redis primary has it in memory
(and, with the persistence the deployment runs, on its disk: docs/operations.md). With
``ACK_MODE=replicated`` each write also waits (``WAIT``) for ``ACK_REPLICAS`` replicas to
have it, at most ``ACK_TIMEOUT``; a write they do not confirm in time is answered 503 with
``Retry-After`` and not acknowledged (``service/store.py``).

The health checker reads ``INFO replication`` every round (``replication_check``): the role
of the Redis the service writes to, its replicas online and their lag. Readiness shows it;
in replicated mode it fails while fewer replicas than required are online, and meanwhile
the writer answers 503 at once instead of waiting out ``ACK_TIMEOUT`` per write. The
heartbeat carries the same figures to the sidecar.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from shared.health import Check, CheckFailedError

from .store import ReadingsWriter

__all__ = ("PRIMARY", "REPLICATED", "Replication", "replication_check")

PRIMARY = "primary"
REPLICATED = "replicated"


@dataclass(slots=True)
class Replication:
    """The last look at the Redis the service writes to (nothing yet: role "unknown")."""

    mode: str
    required: int  # replicas an ack waits for; 0 in primary mode
    role: str = "unknown"
    replicas_online: int = 0
    # The largest lag of an online replica, seconds since its last acknowledgement (Redis
    # counts whole seconds).
    lag_seconds: int = 0


def replication_check(redis: Redis, writer: ReadingsWriter, state: Replication) -> Check:
    async def check() -> Mapping[str, Any]:
        info = await redis.info("replication")
        replicas = [
            value
            for name, value in info.items()
            if name.startswith("slave") and name[5:].isdigit() and isinstance(value, dict)
        ]
        online = [r for r in replicas if r.get("state") == "online"]
        state.role = "primary" if info.get("role") == "master" else "replica"
        state.replicas_online = len(online)
        state.lag_seconds = max((int(r.get("lag", 0)) for r in online), default=0)
        writer.replicas_online = len(online)
        details = {
            "ackMode": state.mode,
            "role": state.role,
            "replicasOnline": state.replicas_online,
            "replicasRequired": state.required,
            "lagSeconds": state.lag_seconds,
        }
        if state.role != "primary":
            raise CheckFailedError("the Redis the service writes to is a replica")
        if state.replicas_online < state.required:
            raise CheckFailedError(
                f"acks wait for {state.required} replicas, {state.replicas_online} online"
            )
        return details

    return check
