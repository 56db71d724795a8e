"""What the worker's probes and heartbeat read, gathered in one object."""

import time
from dataclasses import dataclass, field

from shared.reporting import LoopLagMonitor, Telemetry

from .analysis_jobs import AnalysisRunner, WindowScheduler
from .persist import ReadingsPersister

__all__ = ("WorkerState",)


@dataclass(slots=True, eq=False)
class WorkerState:
    persister: ReadingsPersister
    telemetry: Telemetry
    loop_lag: LoopLagMonitor
    scheduler: WindowScheduler | None = None
    runner: AnalysisRunner | None = None
    draining: bool = False
    started: bool = False
    schema_ready: bool = False
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    # From the stream janitor and the periodic alert count.
    queue_depth: int = 0
    dead_letters: int = 0
    alerts_open: int = 0
