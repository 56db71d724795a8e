"""Redis key names. Every key carries the configured prefix.

Keys that one Lua script touches share a hash tag, so the layout works on Redis Cluster:
a readings partition's stream and its devices' write state sit under the partition's tag
(``{ingest}`` for the single partition of P = 1, ``shared/partitions.py``); a pod's telemetry
stream and heartbeat (and the sidecar's state for that pod) sit under ``{<pod>}``.

What is kept per entity and how it goes: a pod's keys expire (heartbeat: ``HEARTBEAT_TTL``;
telemetry stream and sidecar state: ``SIDECAR_STATE_TTL`` after their last write) and a worker
removes them once the pod is gone for ``POD_KEYS_GRACE`` (``pods_seen``); a device's write
state and rate-limit cells and the analysis window markers expire; the live workers expire by
score; the streams of a retired layout and the idle consumers of dead workers are removed by a
worker (``worker/cleaner.py``). Dead letters are capped by ``DEAD_LETTER_MAXLEN``.
"""

from dataclasses import dataclass

from .partitions import Partition, layout

__all__ = ("Keys", "PartitionKeys")


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The keys of one readings partition, all under its hash tag (``shared/partitions.py``):
    the write script touches the stream and the state; the worker adds a dead letter and
    acknowledges its entry in one MULTI."""

    partition: Partition
    readings: str
    # The devices' write state (idempotency window and GCRA cells), one hash per generation:
    # this prefix and the generation's number (``service/store.py``).
    ingest_state_prefix: str
    # Dead-letter stream: batches (or whole entries) given up, each with the reason.
    readings_dead: str
    # Hash of a readings batch -> why Postgres refused it last, for its dead letter: the
    # entry id of a one-batch entry, ``<entry id>/<index>`` of a batch of several.
    readings_errors: str


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "pulsecal:"

    def partition(self, partition: Partition) -> PartitionKeys:
        base = f"{self.prefix}{{{partition.tag}}}"
        return PartitionKeys(
            partition,
            f"{base}:readings",
            f"{base}:state:",
            f"{base}:readings:dead",
            f"{base}:readings:errors",
        )

    def partitions(self, count: int) -> tuple[PartitionKeys, ...]:
        """The keys of every partition of the layout of ``count``."""
        return tuple(self.partition(p) for p in layout(count))

    @property
    def ingest_layouts(self) -> str:
        """Sorted set: the layouts (partition counts) services write, scored by when one last
        said so (ms); the workers consume every layout in it (``worker/partitions.py``)."""
        return f"{self.prefix}{{ingest}}:layouts"

    @property
    def retired_layouts(self) -> str:
        """Sorted set: the layouts the workers forgot (drained, no longer written), scored by
        when (ms); a worker deletes their emptied streams a while later (``worker/cleaner.py``)."""
        return f"{self.prefix}{{ingest}}:layouts:retired"

    @property
    def persist_workers(self) -> str:
        """Sorted set: the live persist consumers, scored by when each expires (ms); they
        divide the partitions among themselves by it."""
        return f"{self.prefix}{{ingest}}:workers"

    @property
    def readings(self) -> str:
        return f"{self.prefix}{{ingest}}:readings"

    @property
    def ingest_state_prefix(self) -> str:
        """The devices' write state (idempotency window and GCRA cells), one hash per
        generation: this prefix and the generation's number (``service/store.py``). Beside
        the readings stream, as the write script touches both."""
        return f"{self.prefix}{{ingest}}:state:"

    def rate_limit(self, policy: str, window: str, key: str) -> str:
        """A client's GCRA cell for routes outside the write path (its own hash slot)."""
        return f"{self.prefix}rl:{policy}:{window}:{{{key}}}"

    def telemetry(self, pod: str) -> str:
        return f"{self.prefix}telemetry:{{{pod}}}"

    def heartbeat(self, pod: str) -> str:
        return f"{self.prefix}heartbeat:{{{pod}}}"

    def sidecar_state(self, pod: str) -> str:
        """The sidecar's checkpoint: its stream position and the totals that match it."""
        return f"{self.prefix}sidecar:{{{pod}}}:state"

    def pod_keys(self, pod: str) -> tuple[str, str, str]:
        """Every key kept for a pod: its heartbeat, telemetry stream and sidecar state (one
        hash slot, ``{<pod>}``)."""
        return self.heartbeat(pod), self.telemetry(pod), self.sidecar_state(pod)

    # The pods that wrote a heartbeat, and the lease of the worker that removes the keys of
    # those gone (``worker/cleaner.py``): under {pods}, a slot of their own.
    @property
    def pods_seen(self) -> str:
        """Sorted set: every pod whose heartbeat was written, scored by when it last was
        (ms); the pods gone for ``POD_KEYS_GRACE`` are removed with their keys."""
        return f"{self.prefix}{{pods}}:seen"

    @property
    def cleaner_lease(self) -> str:
        """The worker removing what is left of gone pods and retired layouts holds this."""
        return f"{self.prefix}{{pods}}:cleaner"

    # The worker (docs/worker-and-alerts.md). Its readings keys sit beside the stream under
    # {ingest}: a dead letter is added and its entry acknowledged in one MULTI.
    @property
    def readings_dead(self) -> str:
        """Dead-letter stream: batches (or whole entries) given up, each with the reason."""
        return f"{self.prefix}{{ingest}}:readings:dead"

    @property
    def readings_errors(self) -> str:
        """Hash of a readings batch -> why Postgres refused it last, for its dead letter: the
        entry id of a one-batch entry, ``<entry id>/<index>`` of a batch of several."""
        return f"{self.prefix}{{ingest}}:readings:errors"

    # Analysis jobs and the markers that make one job per device window: under {jobs}, as
    # the scheduling script touches both.
    @property
    def analysis_jobs(self) -> str:
        return f"{self.prefix}{{jobs}}:analysis"

    def analysis_window(self, device_id: str, start_ms: int) -> str:
        return f"{self.prefix}{{jobs}}:window:{device_id}:{start_ms}"
