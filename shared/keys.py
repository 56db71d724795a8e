"""Redis key names. Every key carries the configured prefix.

Keys that one Lua script touches share a hash tag, so the layout works on Redis Cluster:
the readings stream and the idempotency sets sit under ``{ingest}``; a pod's telemetry
stream and heartbeat (and the sidecar's state for that pod) sit under ``{<pod>}``.
"""

from dataclasses import dataclass

__all__ = ("Keys",)


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "pulsecal:"

    @property
    def readings(self) -> str:
        return f"{self.prefix}{{ingest}}:readings"

    @property
    def seen_prefix(self) -> str:
        return f"{self.prefix}{{ingest}}:seen:"

    def seen(self, device_id: str) -> str:
        return f"{self.seen_prefix}{device_id}"

    def telemetry(self, pod: str) -> str:
        return f"{self.prefix}telemetry:{{{pod}}}"

    def heartbeat(self, pod: str) -> str:
        return f"{self.prefix}heartbeat:{{{pod}}}"
