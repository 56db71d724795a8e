"""What the worker's probes and heartbeat read, gathered in one object."""

from dataclasses import dataclass

from shared.reporting import LoopLagMonitor, Telemetry
from shared.telemetry import PostgresStats

from .analysis_jobs import AnalysisRunner, WindowScheduler
from .partitions import PartitionedPersistence

__all__ = ("WorkerState",)


@dataclass(slots=True, eq=False)
class WorkerState:
    persister: PartitionedPersistence
    telemetry: Telemetry
    loop_lag: LoopLagMonitor
    scheduler: WindowScheduler | None = None
    runner: AnalysisRunner | None = None
    draining: bool = False
    schema_ready: bool = False
    # From the stream janitor and the periodic alert count.
    queue_depth: int = 0
    dead_letters: int = 0
    alerts_open: int = 0
    # The database's figures (worker/dbstats.py), None until first measured.
    postgres: PostgresStats | None = None
