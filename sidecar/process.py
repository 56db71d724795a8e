"""The sidecar's own process figures, read from /proc (Linux; zeros elsewhere)."""

import os
import time
from dataclasses import dataclass

__all__ = ("ProcessStats", "own_process")

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcessStats:
    rss_bytes: int
    # Resident memory not backed by files: what grows when the process leaks (Python has no
    # single heap figure). The service reports the same measure in its heartbeat.
    heap_bytes: int
    virtual_bytes: int
    cpu_seconds: float
    start_time_s: float
    open_fds: int


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def own_process() -> ProcessStats:
    try:
        with open("/proc/self/statm", "rb") as f:
            statm = f.read().split()
        with open("/proc/self/stat", "rb") as f:
            # The command name may hold spaces: the fields that matter follow its ')'.
            stat = f.read().rpartition(b")")[2].split()
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        return ProcessStats(0, 0, 0, time.process_time(), 0.0, 0)
    resident, shared = int(statm[1]), int(statm[2])
    # stat fields after the name, 0-based from field 3: utime 11, stime 12, starttime 19.
    cpu = (int(stat[11]) + int(stat[12])) / _TICKS
    started = _boot_time() + int(stat[19]) / _TICKS
    return ProcessStats(
        rss_bytes=resident * _PAGE_SIZE,
        heap_bytes=(resident - shared) * _PAGE_SIZE,
        virtual_bytes=int(statm[0]) * _PAGE_SIZE,
        cpu_seconds=cpu,
        start_time_s=started,
        open_fds=open_fds,
    )
