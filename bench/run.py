"""PulseCal benchmark: the service against a bare aiohttp baseline and the conventional design.

Run from the repository root with the project's virtualenv (bench extras installed) and
``npm ci`` done in bench/::

    .venv/bin/python bench/run.py [--duration 10] [--connections 64] [--quick]

Every figure is a ratio against a baseline measured in the same run, on the same machine:
the server under test is pinned to core 0 and the load generator (wrk or node) to core 1.
The harness starts its own throwaway Redis (pinned to core 1 as well, so core 0 holds
nothing but the server) and a throwaway database in the local Postgres (or its own cluster
when none answers), registers devices with ``pulsecal-admin``, then measures:

- HTTP: bare_http, pulsecal-service, service_replicated and the conventional peer under wrk;
- WebSocket: bare_ws, pulsecal-service and service_replicated under bench/ws/load.js;
- memory: RSS of bare_ws and of a fresh pulsecal-service before and after N idle sockets.

``service_replicated`` is pulsecal-service with ``ACK_MODE=replicated ACK_REPLICAS=1``
(``ACK_TIMEOUT`` at its default): each write is followed by ``WAIT 1 <timeout>`` and a batch is
acknowledged only once a replica has it. For its rounds only, the harness starts a second
throwaway redis-server as a replica of its Redis (same flags, no persistence, pinned to core 1
as well), waits until it is in sync (``master_link_status:up``, no sync in progress), flushes
both (the primary's FLUSHALL reaches the replica; ``WAIT`` confirms it), and measures only once
the service's readiness, whose ``redis-replication`` check wants the replica online, answers
200; the replica stops after the round, so every other server runs against a primary without
replicas. A 503 (a write the replica did not confirm in time) or a WebSocket error reply counts
as an error of the run, as for every server. The report gives its acked req/s and msg/s over
the service's in primary mode and over bare, and its server and Redis CPU per request and per
message. ``--no-replicated`` skips it.

Core 1's split: for every HTTP and WebSocket run, the CPU seconds and share of core 1 over the
measured window of the load generator, Redis, the replica (replicated runs) and the trace
sink, each's CPU per request or message, and the rest of the core's busy time (interrupts and
softirqs, where loopback networking runs, and processes the harness did not start); per run
under ``core1`` in the JSON, medians under ``core1_split``.

The report goes to stdout and bench/results/latest.md, raw data to bench/results/latest.json.
Exit status: 0 for a clean run (a busy machine only adds warnings), 1 when a run had errors
(non-2xx, socket errors, WebSocket errors, nothing answered, a crash, error lines in a
server's log) and with ``--strict`` also when a target is missed; 2 when the harness itself
could not go on (a tool missing, a server that would not start); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import aiohttp
import psycopg
import redis
from psycopg.conninfo import conninfo_to_dict

from shared.keys import Keys
from shared.readings import decode_entries

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
SERVER_CORE = "0"
LOAD_CORE = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SEQ_RUN_STRIDE = 10**12  # wrk and load.js keep each run's seqs below base + 10^12
SERVICE_KEY_PREFIX = "bench:"
SERVICE_NAMES = ("service", "service_replicated")
CONVENTIONAL_STREAM = "conventional:readings"
HUGE_BACKLOG = "1000000000000"

TARGETS: dict[str, tuple[str, float]] = {
    "http_rps_service_over_bare": (">=", 0.75),
    "http_rps_service_over_conventional": (">=", 5.0),
    "http_p99_service_over_bare": ("<=", 2.0),
    "ws_rate_service_over_bare": (">=", 0.75),
}


class HarnessError(RuntimeError):
    """The harness cannot go on (a tool is missing, a server would not start, ...)."""


# --------------------------------------------------------------------------- processes


def _raise_nofile() -> None:
    """preexec_fn: open-files soft limit up to the hard one (10k sockets need it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _exited_unreaped(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit, leaving it unreaped; False if it has not."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True  # already reaped elsewhere
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def nofile_hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(core: str, argv: Sequence[str]) -> list[str]:
    """taskset execs the command, so the child's pid is the command's pid."""
    return ["taskset", "-c", core, *argv]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[Any]
    log_path: Path | None
    stopped: bool = False
    stop_s: float | None = None  # seconds from SIGTERM to exit
    killed: bool = False  # needed SIGKILL

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Processes:
    """Every process the harness starts, so that all of them end, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.started = 0

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
    ) -> Proc:
        self.started += 1
        log_path = self.workdir / f"{self.started:02d}-{name}.log"
        log: IO[bytes] = log_path.open("ab")
        try:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                text=stdout_pipe or stdin_pipe,
                start_new_session=True,
                preexec_fn=_raise_nofile,  # no other threads run while processes start
                cwd=self.workdir,  # not the repo: an import from cwd would shadow --service-src
            )
        finally:
            log.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, then SIGKILL; returns the exit code.

        The leader is reaped last: until then its pid, the group's id, cannot be reused, so
        the final SIGKILL to the group (for children that outlive it, like node workers)
        cannot reach anyone else's process.
        """
        proc.stopped = True
        if proc.popen.returncode is None:  # not reaped yet
            started = time.monotonic()
            if not _exited_unreaped(proc.pid, 0):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                if not _exited_unreaped(proc.pid, timeout):
                    proc.killed = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    _exited_unreaped(proc.pid, 5)
                proc.stop_s = round(time.monotonic() - started, 2)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(5)
        for stream in (proc.popen.stdout, proc.popen.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)


@contextlib.contextmanager
def watchdog(proc: Proc, seconds: float) -> Iterator[None]:
    """SIGKILL ``proc``'s group if the block is still running after ``seconds``.

    The blocks read a tool's output to its end; killing the tool ends the read.
    """

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(seconds, kill)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# --------------------------------------------------------------------------- /proc sampling


def proc_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise HarnessError(f"no VmRSS for pid {pid}")


def core_times(*, only: str = "busy") -> dict[str, tuple[int, int]]:
    """Per core: (jiffies of one kind, total jiffies) from /proc/stat.

    ``busy``: everything but idle and iowait. ``process``: user, nice and system only, the
    time that shows up in some process's utime/stime, without interrupts and softirqs
    (loopback networking runs there). ``steal``: time the hypervisor gave to someone else.
    """
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *rest = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        v = [int(x) for x in rest[:8]]
        total = sum(v)
        kind = {"busy": total - v[3] - v[4], "process": v[0] + v[1] + v[2], "steal": v[7]}
        out[name.removeprefix("cpu")] = (kind[only], total)
    return out


def _busy_pct(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for core, (busy1, total1) in after.items():
        busy0, total0 = before.get(core, (busy1, total1))
        span = total1 - total0
        out[core] = round(100.0 * (busy1 - busy0) / span, 1) if span > 0 else 0.0
    return out


@dataclass
class CpuWindow:
    """CPU used by groups of processes and by each core over a window of wall time.

    ``background`` groups are measured as well but, unlike ``groups``, not told apart from
    other work on the machine in ``other_cpu_pct``.
    """

    groups: dict[str, Callable[[], list[int]]]
    background: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    t0: float = 0.0
    ticks0: dict[str, dict[int, int]] = field(default_factory=dict)
    cores0: dict[str, tuple[int, int]] = field(default_factory=dict)
    proc_cores0: dict[str, tuple[int, int]] = field(default_factory=dict)
    steal0: dict[str, tuple[int, int]] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    def _ticks(self) -> dict[str, dict[int, int]]:
        return {
            name: {pid: proc_ticks(pid) for pid in pids()}
            for name, pids in (self.groups | self.background).items()
        }

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.ticks0 = self._ticks()
        self.cores0 = core_times()
        self.proc_cores0 = core_times(only="process")
        self.steal0 = core_times(only="steal")

    def stop(self, extra_cpu_s: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Close the window; ``extra_cpu_s`` adds groups measured another way (rusage)."""
        wall = time.monotonic() - self.t0
        ticks1 = self._ticks()
        cores1 = core_times()
        proc_cores1 = core_times(only="process")
        steal1 = core_times(only="steal")
        used_s: dict[str, float] = {}
        for name, now in ticks1.items():
            before = self.ticks0.get(name, {})
            used_s[name] = sum(t - before.get(pid, 0) for pid, t in now.items()) / CLK_TCK
        used_s.update(extra_cpu_s or {})
        background_s = {name: used_s.pop(name) for name in self.background}
        percent = {
            name: round(100.0 * s / wall, 1) if wall > 0 else 0.0 for name, s in used_s.items()
        }
        cores = _busy_pct(self.cores0, cores1)
        steal = _busy_pct(self.steal0, steal1)
        # Process time that none of the measured processes used: other work on the machine.
        proc_time = _busy_pct(self.proc_cores0, proc_cores1)
        other = sum(proc_time.values()) - sum(percent.values())
        self.result = {
            "wall_s": round(wall, 3),
            "process_cpu_pct": percent,
            "core_busy_pct": cores,
            "steal_pct": steal,
            "irq_softirq_pct": {
                core: round(cores[core] - proc_time.get(core, 0.0) - steal.get(core, 0.0), 1)
                for core in cores
            },
            "other_cpu_pct": round(max(other, 0.0), 1),
            "process_cpu_s": {name: round(s, 3) for name, s in used_s.items()},
            "background_cpu_s": {name: round(s, 3) for name, s in background_s.items()},
        }
        return self.result


def machine_busy_pct(seconds: float = 1.0) -> float:
    """CPU busy over all cores for ``seconds``, in percent of one core."""
    before = core_times()
    time.sleep(seconds)
    return sum(_busy_pct(before, core_times()).values())


# --------------------------------------------------------------------------- infrastructure


def log_summary(path: Path, samples: int = 3) -> dict[str, Any]:
    """Lines a server wrote by level: JSON lines (``level`` field), else plain text."""
    levels: dict[str, int] = {}
    kept: list[str] = []
    errors = warnings = 0
    with path.open("rb") as f:
        for raw in f:
            line = raw.decode(errors="replace").rstrip()
            level = ""
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    value = record.get("level", "")
                    if isinstance(value, dict):  # loguru's own serialize=True layout
                        value = value.get("name", "")
                    level = str(value).lower()
            elif "Traceback" in line or line.startswith(("ERROR", "CRITICAL")):
                level = "error"
            elif line.startswith("WARNING"):
                level = "warning"
            levels[level or "other"] = levels.get(level or "other", 0) + 1
            if level in ("error", "critical", "exception"):
                errors += 1
            elif level == "warning":
                warnings += 1
            else:
                continue
            if len(kept) < samples:
                kept.append(line[:500])
    return {"lines_by_level": levels, "errors": errors, "warnings": warnings, "samples": kept}


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(
    proc: Proc, port: int, path: str = "/health/startup", timeout: float = 60.0
) -> float:
    """Poll the startup probe until 200; returns the seconds it took."""
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < timeout:
        if not proc.alive():
            raise HarnessError(
                f"{proc.name} exited with {proc.popen.returncode} before it was ready:\n"
                f"{proc.log_tail()}"
            )
        try:
            status, body = http_get(port, path, timeout=1.0)
        except OSError as e:
            last = str(e)
        else:
            if status == 200:
                return time.monotonic() - started
            last = f"{status} {body[:300]!r}"
        time.sleep(0.1)
    raise HarnessError(f"{proc.name} not ready after {timeout:.0f}s ({last}):\n{proc.log_tail()}")


@dataclass
class RedisServer:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)


def start_redis(
    procs: Processes, workdir: Path, *, replica_of: RedisServer | None = None
) -> RedisServer:
    """A throwaway redis-server on core 1, no persistence; ``replica_of``: a replica of it.

    ``--repl-diskless-sync-delay 0`` is what lets a replica sync at once: a primary waits
    that long (5 s by default) for more replicas before it streams the dataset.
    """
    if shutil.which("redis-server") is None:
        raise HarnessError("redis-server is not on PATH")
    name = "redis" if replica_of is None else "redis-replica"
    port = free_port()
    data = workdir / (name if replica_of is None else f"{name}-{port}")  # one per start
    data.mkdir()
    argv = [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(data),
        "--maxclients", "20000",
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip
    if replica_of is not None:
        argv += ["--replicaof", "127.0.0.1", str(replica_of.port)]
    proc = procs.start(name, pinned(LOAD_CORE, argv))
    server = RedisServer(proc, port)
    deadline = time.monotonic() + 10
    while True:
        try:
            if server.client().ping():
                return server
        except redis.RedisError:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            raise HarnessError(f"{name} did not start:\n{proc.log_tail()}")
        time.sleep(0.05)


def wait_in_sync(replica: RedisServer, timeout: float = 30.0) -> float:
    """Wait until the replica has the primary's dataset and follows its stream; seconds."""
    started = time.monotonic()
    info: dict[str, Any] = {}
    while time.monotonic() - started < timeout:
        if not replica.proc.alive():
            raise HarnessError(f"the Redis replica exited:\n{replica.proc.log_tail()}")
        try:
            info = replica.client().info("replication")
        except redis.RedisError as e:
            info = {"error": str(e)}
        if info.get("master_link_status") == "up" and not info.get("master_sync_in_progress"):
            return time.monotonic() - started
        time.sleep(0.05)
    raise HarnessError(
        f"the Redis replica was not in sync after {timeout:.0f}s ({info}):\n"
        f"{replica.proc.log_tail()}"
    )


@dataclass
class Database:
    url: str
    how: str
    drop: Callable[[], None]


def _pg_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def prepare_database(procs: Processes, workdir: Path, admin_url: str) -> Database:
    """A throwaway database: in the local Postgres when it answers, else in our own cluster."""
    if not _pg_answers(admin_url):
        admin_url = start_own_postgres(procs, workdir)
        how = "own throwaway cluster (initdb)"
    else:
        how = "throwaway database in the Postgres at DATABASE_URL"
    name = f"pulsecal_bench_{os.getpid()}_{int(time.time())}"
    base = conninfo_to_dict(admin_url)
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as e:
        print(f"bench: cannot create a database ({e}); using {admin_url} as it is", file=sys.stderr)
        return Database(
            admin_url, "existing database at DATABASE_URL (CREATE DATABASE refused)", lambda: None
        )
    # pulsecal-admin and the service expect a URL, not a conninfo string.
    user = base.get("user", "postgres")
    host = base.get("host", "127.0.0.1")
    port = base.get("port", "5432")
    password = f":{base['password']}" if base.get("password") else ""
    url = f"postgresql://{user}{password}@{host}:{port}/{name}"

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return Database(url, how, drop)


def start_own_postgres(procs: Processes, workdir: Path) -> str:
    for tool in ("initdb", "pg_ctl", "postgres"):
        if shutil.which(tool) is None:
            raise HarnessError(f"no Postgres answers and {tool} is not on PATH")
    data = workdir / "pg"
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            raise HarnessError("running as root and runuser is missing: cannot run initdb")
        as_user = ["runuser", "-u", "postgres", "--"]
        workdir.chmod(0o755)
        data.mkdir(mode=0o700)
        shutil.chown(data, "postgres")
    subprocess.run(
        [*as_user, "initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    argv = [*as_user, "postgres", "-D", str(data), "-p", str(port), "-k", str(data),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]  # fmt: skip
    proc = procs.start("postgres", argv)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 30
    while not _pg_answers(url):
        if not proc.alive() or time.monotonic() > deadline:
            raise HarnessError(f"own Postgres did not start:\n{proc.log_tail()}")
        time.sleep(0.2)
    return url


@dataclass(frozen=True)
class Device:
    device_id: str
    token: str


def service_env(source: Path | None) -> dict[str, str]:
    """Environment for pulsecal-service/-admin: ``source`` (a checkout) shadows the install."""
    if source is None:
        return {}
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{source}{os.pathsep}{path}" if path else str(source)}


def register_devices(
    database_url: str, count: int, devices_file: Path, source: Path | None
) -> list[Device]:
    admin = Path(sys.executable).with_name("pulsecal-admin")
    if not admin.exists():
        raise HarnessError(f"{admin} is missing: pip install -e '.[bench]'")
    env = {**os.environ, **service_env(source), "DATABASE_URL": database_url}
    upgrade = subprocess.run(
        [str(admin), "db", "upgrade"], env=env, capture_output=True, text=True, check=False
    )
    if upgrade.returncode != 0:
        raise HarnessError(f"pulsecal-admin db upgrade failed:\n{upgrade.stderr}")

    def add(i: int) -> Device:
        device_id = f"bench-{i:03d}"
        for extra in ([], ["--rotate"]):
            done = subprocess.run(
                [str(admin), "device", "add", device_id, *extra],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                return Device(device_id, done.stdout.strip().splitlines()[-1])
        raise HarnessError(f"pulsecal-admin device add {device_id} failed:\n{done.stderr}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        devices = list(pool.map(add, range(count)))
    devices_file.write_text("".join(f"{d.device_id} {d.token}\n" for d in devices))
    return devices


def stream_batches(client: redis.Redis, stream: str, page: int = 1000) -> int:
    """The batches a readings stream holds: an entry carries every batch of one write."""
    count, start = 0, "-"
    while True:
        reply = client.xrange(stream, start, "+", count=page)
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], reply or [])
        count += sum(len(decode_entries(fields)) for _id, fields in entries)
        if len(entries) < page:
            return count
        start = "(" + entries[-1][0].decode()


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    # The service with replicated acks: a Redis replica runs beside the primary meanwhile.
    replicated: bool = False

    @property
    def is_service(self) -> bool:
        return self.name in SERVICE_NAMES


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: Proc
    port: int
    ready_s: float


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.redis: RedisServer | None = None
        self.replica: RedisServer | None = None  # only while a replicated server runs
        self.sink: Proc | None = None  # the trace sink, on core 1 as well
        self.devices_file = workdir / "devices.txt"
        self.seq_base = 0
        self.tag = ""  # " (round i/n)" while rounds repeat
        self.harness_failed = False
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []

    # ---- servers

    def next_seq_base(self) -> int:
        self.seq_base += SEQ_RUN_STRIDE
        return self.seq_base

    def wait_quiet(self, label: str) -> None:
        """Wait (bounded) until other processes leave the cores alone; warn if they never do."""
        limit = self.args.quiet_threshold
        deadline = time.monotonic() + self.args.wait_quiet
        busy = machine_busy_pct()
        while busy > limit and time.monotonic() < deadline:
            busy = machine_busy_pct()
        if busy > limit:
            self.warnings.append(
                f"{label}: other processes were using {busy:.0f} % of a core when it started "
                f"(waited {self.args.wait_quiet:g} s for the machine to go quiet)"
            )

    def check_noise(self, label: str, cpu: Mapping[str, Any]) -> None:
        other = cpu.get("other_cpu_pct")
        if other is not None and other > self.args.quiet_threshold:
            self.warnings.append(
                f"{label}: other processes used {other:.0f} % of a core during the measured "
                "window; its figures are disturbed"
            )

    def start_server(self, spec: ServerSpec, label: str) -> RunningServer:
        self.wait_quiet(label)
        for attempt in (1, 2):
            port = free_port()  # another process may take it before the server binds it
            env = {**os.environ, **dict(spec.env), "PORT": str(port)}
            proc = self.procs.start(spec.name, pinned(SERVER_CORE, spec.argv), env=env)
            try:
                ready = wait_ready(proc, port)
            except HarnessError as e:
                died = not proc.alive()  # rather than never answering
                self.procs.stop(proc)
                if attempt == 2 or not died:
                    raise
                self.warnings.append(f"{label}: first start failed, started it again: {e}")
                continue
            return RunningServer(spec, proc, port, round(ready, 2))
        raise AssertionError("unreachable")

    def stop_server(self, server: RunningServer, label: str) -> dict[str, Any]:
        """Stop a server; note a crash and what it logged at warning level or above."""
        crashed = not server.proc.alive()
        code = self.procs.stop(server.proc)
        info: dict[str, Any] = {
            "exit_code": code,
            "crashed_during_run": crashed,
            "stop_s": server.proc.stop_s,
            "sigkilled": server.proc.killed,
        }
        if server.proc.killed:
            self.warnings.append(
                f"{label}: {server.spec.name} did not exit within 15 s of SIGTERM and was "
                f"killed; log tail:\n{server.proc.log_tail(5)}"
            )
        if crashed:
            self.problems.append(
                f"{label}: {server.spec.name} died during the run (exit {code}); log tail:\n"
                f"{server.proc.log_tail()}"
            )
        if server.proc.log_path is not None:
            info["server_log"] = log_summary(server.proc.log_path)
            info["server_log_file"] = server.proc.log_path.name
            bad = info["server_log"]["errors"]
            if bad:
                self.problems.append(
                    f"{label}: {server.spec.name} logged {bad} error line(s), e.g.:\n"
                    + "\n".join(info["server_log"]["samples"])
                )
            elif info["server_log"]["warnings"]:
                self.warnings.append(
                    f"{label}: {server.spec.name} logged {info['server_log']['warnings']} "
                    f"warning line(s), e.g. {info['server_log']['samples'][0]}"
                )
        return info

    def flush_redis(self) -> None:
        """Empty the harness's Redis, and its replica when one runs.

        A replica refuses writes: the primary's FLUSHALL reaches it through the replication
        stream, and ``WAIT`` returns once it has applied it.
        """
        assert self.redis is not None
        primary = self.redis.client()
        primary.flushall()
        if self.replica is None:
            return
        confirmed = primary.wait(1, 10_000)
        left = self.replica.client().dbsize()
        if confirmed < 1 or left:
            raise HarnessError(
                f"the Redis replica did not follow FLUSHALL ({confirmed} replicas confirmed, "
                f"{left} keys left on it):\n{self.replica.proc.log_tail()}"
            )

    @contextlib.contextmanager
    def redis_for(self, spec: ServerSpec, label: str) -> Iterator[None]:
        """Flushed Redis for one round; for a replicated server, a replica in sync with it.

        The replica lives for that round only, so that every other server runs against a
        primary without replicas, as before.
        """
        self.flush_redis()
        if not spec.replicated:
            yield
            return
        assert self.redis is not None
        replica = start_redis(self.procs, self.workdir, replica_of=self.redis)
        try:
            wait_in_sync(replica)
            self.replica = replica
            self.flush_redis()
            yield
            if not replica.proc.alive():
                self.problems.append(
                    f"{label}: the Redis replica died during the run:\n{replica.proc.log_tail()}"
                )
        finally:
            self.replica = None
            self.procs.stop(replica.proc)

    def cpu_groups(self, server_pid: int) -> dict[str, Callable[[], list[int]]]:
        """The processes a load run measures, besides the load generator."""
        assert self.redis is not None
        redis_pid = self.redis.proc.pid
        groups: dict[str, Callable[[], list[int]]] = {
            "server": lambda: [server_pid],
            "redis": lambda: [redis_pid],
        }
        if self.replica is not None:
            replica_pid = self.replica.proc.pid
            groups["redis_replica"] = lambda: [replica_pid]
        return groups

    def cpu_background(self) -> dict[str, Callable[[], list[int]]]:
        """Core 1's other process, measured for its split but left in ``other_cpu_pct``."""
        if self.sink is None:
            return {}
        sink_pid = self.sink.pid
        return {"otlp_sink": lambda: [sink_pid]}

    def wait_replicas(self, spec: ServerSpec, server: RunningServer) -> None:
        """Replicated acks: readiness (its redis-replication check) must pass first."""
        if spec.replicated:
            wait_ready(server.proc, server.port, "/health/readiness", timeout=30.0)

    # ---- HTTP load

    def wrk(self, port: int, duration: float, server_pid: int) -> dict[str, Any]:
        env = {
            **os.environ,
            "PULSECAL_DEVICES": str(self.devices_file),
            "PULSECAL_SEQ_BASE": str(self.next_seq_base()),
            "PULSECAL_SAMPLES": str(self.args.samples),
        }
        argv = pinned(
            LOAD_CORE,
            [
                "wrk",
                f"-t{self.args.wrk_threads}",
                f"-c{self.args.connections}",
                f"-d{max(1, round(duration))}s",  # wrk takes whole seconds
                "--timeout",
                "10s",
                "--latency",
                "-s",
                str(BENCH / "wrk" / "ingest.lua"),
                f"http://127.0.0.1:{port}/ingestion/ppg",
            ],
        )
        proc = self.procs.start("wrk", argv, env=env, stdout_pipe=True)
        window = CpuWindow(self.cpu_groups(server_pid), self.cpu_background())
        window.start()
        try:
            assert proc.popen.stdout is not None
            with watchdog(proc, duration + 60):
                out = proc.popen.stdout.read()  # until wrk exits
                # wait4 rather than Popen.wait: wrk is gone by the time the window closes,
                # and its own rusage is the only record of the CPU it used.
                _pid, status, usage = os.wait4(proc.pid, 0)
            proc.popen.returncode = os.waitstatus_to_exitcode(status)
            cpu = window.stop(extra_cpu_s={"loadgen": usage.ru_utime + usage.ru_stime})
        finally:
            self.procs.stop(proc)
        parsed: dict[str, Any] | None = None
        for line in out.splitlines():
            if line.startswith("PULSECAL_WRK_JSON "):
                parsed = json.loads(line.removeprefix("PULSECAL_WRK_JSON "))
        if parsed is None:
            raise HarnessError(
                f"wrk printed no result (exit {proc.popen.returncode}):\n{out}\n{proc.log_tail()}"
            )
        errors = parsed["errors"]
        seconds = parsed["duration_us"] / 1e6
        # wrk prints zeros (and a negative min) when nothing was answered: no latency then.
        lat = {k: (v if parsed["requests"] else None) for k, v in parsed["latency_us"].items()}
        return {
            "requests": parsed["requests"],
            "seconds": round(seconds, 3),
            "rps": round(parsed["requests"] / seconds, 1),
            # 2xx answers only: what was acknowledged (equal to rps in a run without errors).
            "acked_rps": round((parsed["requests"] - errors["status"]) / seconds, 1),
            **{f"{k}_ms": (v / 1000 if v is not None else None) for k, v in lat.items()},
            "non_2xx": errors["status"],
            "socket_errors": {k: errors[k] for k in ("connect", "read", "write", "timeout")},
            "cpu": cpu,
            "server_us_per_req": server_us_per_item(cpu, parsed["requests"]),
            "core1": core1_split(cpu, parsed["requests"]),
            "wrk_output": out,
        }

    def measure(self, kind: str, spec: ServerSpec) -> dict[str, Any]:
        """One HTTP or WS measurement, repeated while other work disturbed it (bounded)."""
        run = self.http_round if kind == "HTTP" else self.ws_round
        kept: dict[str, Any] | None = None
        tries = 1 + self.args.retry_disturbed
        for attempt in range(1, tries + 1):
            result = run(spec)
            result["attempt"] = attempt
            other = result["cpu"].get("other_cpu_pct") or 0.0
            if kept is None or other < (kept["cpu"].get("other_cpu_pct") or 0.0):
                kept = result
            if other <= self.args.quiet_threshold:
                break
            if attempt < tries:
                print(
                    f"bench: {kind} {spec.name}: other processes used {other:.0f} % of a core; "
                    "measuring again",
                    file=sys.stderr,
                    flush=True,
                )
        assert kept is not None
        self.check_noise(f"{kind} {spec.name}{self.tag}", kept["cpu"])
        return kept

    def http_round(self, spec: ServerSpec) -> dict[str, Any]:
        label = f"HTTP {spec.name}{self.tag}"
        with self.redis_for(spec, label):
            return self._http_round(spec)

    def _http_round(self, spec: ServerSpec) -> dict[str, Any]:
        # Each round's JSON log starts empty, so its line count is this round's.
        (self.workdir / "logs-conventional" / "requests.log").unlink(missing_ok=True)
        server = self.start_server(spec, f"HTTP {spec.name}{self.tag}")
        try:
            self.wait_replicas(spec, server)
            warm = self.wrk(server.port, self.args.warmup, server.proc.pid)
            result = self.wrk(server.port, self.args.duration, server.proc.pid)
            result["warmup"] = {k: warm[k] for k in ("requests", "rps", "non_2xx", "socket_errors")}
            result["ready_s"] = server.ready_s
            result["checks"] = self.http_checks(spec, server, warm, result)
            result.update(self.stop_server(server, f"HTTP {spec.name}{self.tag}"))
        finally:
            self.procs.stop(server.proc)
        label = spec.name
        total_errors = result["non_2xx"] + sum(result["socket_errors"].values())
        warm_errors = result["warmup"]["non_2xx"] + sum(result["warmup"]["socket_errors"].values())
        if total_errors or warm_errors:
            self.problems.append(
                f"HTTP {label}{self.tag}: {result['non_2xx']} non-2xx and "
                f"{sum(result['socket_errors'].values())} socket errors "
                f"({result['socket_errors']}) in the measured run; "
                f"{warm_errors} errors in the warm-up. Server log tail:\n"
                f"{server.proc.log_tail(15)}"
            )
        if result["requests"] - result["non_2xx"] <= 0:
            # Requests that never get an answer are not errors to wrk, only missing.
            self.problems.append(
                f"HTTP {label}{self.tag}: no request was answered with 2xx in "
                f"{result['seconds']} s ({result['requests']} answered in all)"
            )
        return result

    def http_checks(
        self, spec: ServerSpec, server: RunningServer, warm: dict[str, Any], run: dict[str, Any]
    ) -> dict[str, Any]:
        """What the server really did: stored entries, and for the conventional peer, spans."""
        assert self.redis is not None
        ok_responses = (warm["requests"] - warm["non_2xx"]) + (run["requests"] - run["non_2xx"])
        checks: dict[str, Any] = {"2xx_responses_seen_by_wrk": ok_responses}
        client = self.redis.client()
        if spec.is_service:
            stream = Keys(SERVICE_KEY_PREFIX).readings
            checks["stream_entries"] = client.xlen(stream)
            checks["stream_batches"] = stream_batches(client, stream)
            self.replica_checks(f"HTTP {spec.name}{self.tag}", checks)
        elif spec.name == "conventional":
            checks["stream_entries"] = client.xlen(CONVENTIONAL_STREAM)
            time.sleep(5.5)  # BatchSpanProcessor exports every 5 s
            status, body = http_get(server.port, "/metrics", timeout=10)
            if status == 200:
                for line in body.decode().splitlines():
                    if line.startswith("bench_spans_exported_total "):
                        checks["spans_exported"] = int(float(line.split()[1]))
                    if line.startswith('http_requests_total{method="POST"'):
                        checks.setdefault("prometheus_post_requests", 0)
                        checks["prometheus_post_requests"] += int(float(line.split()[1]))
            log_file = self.workdir / "logs-conventional" / "requests.log"
            if log_file.exists():
                with log_file.open("rb") as f:
                    checks["json_log_lines"] = sum(1 for _ in f)
        # The service's entries carry the batches of one write each, the peer's one batch.
        stored = checks.get("stream_batches", checks.get("stream_entries"))
        if stored is not None and stored < ok_responses:
            self.problems.append(
                f"HTTP {spec.name}{self.tag}: answered 2xx {ok_responses} times but the "
                f"stream holds only {stored} batches"
            )
        return checks

    def replica_checks(self, label: str, checks: dict[str, Any]) -> None:
        """With a replica: once it has caught up, it holds the primary's stream entry for entry."""
        if self.replica is None:
            return
        assert self.redis is not None
        self.redis.client().wait(1, 5_000)
        entries = self.replica.client().xlen(Keys(SERVICE_KEY_PREFIX).readings)
        checks["replica_stream_entries"] = entries
        if entries != checks["stream_entries"]:
            self.problems.append(
                f"{label}: the replica holds {entries} stream entries, the primary "
                f"{checks['stream_entries']}"
            )

    # ---- WebSocket load

    def node(self) -> str:
        node = shutil.which("node")
        if node is None:
            raise HarnessError("node is not on PATH")
        if not (BENCH / "node_modules" / "ws").is_dir():
            raise HarnessError("bench/node_modules/ws is missing: run `npm ci` in bench/")
        return node

    def ws_load(self, port: int, server_pid: int) -> dict[str, Any]:
        argv = pinned(
            LOAD_CORE,
            [
                self.node(),
                str(BENCH / "ws" / "load.js"),
                "--url",
                f"ws://127.0.0.1:{port}/ingestion/ws",
                "--connections",
                str(self.args.connections),
                "--duration",
                f"{self.args.duration:g}",
                "--warmup",
                f"{self.args.warmup:g}",
                "--procs",
                str(self.args.ws_procs),
                "--devices",
                str(self.devices_file),
                "--seq-base",
                str(self.next_seq_base()),
                "--samples",
                str(self.args.samples),
            ],
        )
        proc = self.procs.start("ws-load", argv, stdout_pipe=True)
        window = CpuWindow(
            {
                "loadgen": lambda: [proc.pid, *descendants(proc.pid)],
                **self.cpu_groups(server_pid),
            },
            self.cpu_background(),
        )
        parsed: dict[str, Any] | None = None
        cpu: dict[str, Any] = {}
        try:
            assert proc.popen.stdout is not None
            with watchdog(proc, self.args.warmup + self.args.duration + 120):
                for line in proc.popen.stdout:
                    if line.startswith("PULSECAL_MEASURE_START"):
                        window.start()
                    elif line.startswith("PULSECAL_MEASURE_END"):
                        cpu = window.stop()
                    elif line.startswith("PULSECAL_WS_JSON "):
                        parsed = json.loads(line.removeprefix("PULSECAL_WS_JSON "))
            proc.popen.wait(timeout=30)
        finally:
            self.procs.stop(proc)
        if parsed is None:
            raise HarnessError(f"load.js printed no result:\n{proc.log_tail()}")
        lat = parsed["latency_us"]
        ms = {k: (v / 1000 if v is not None else None) for k, v in lat.items()}
        return {
            "rate": round(parsed["rate"], 1),
            "acked": parsed["acked"],
            "sent": parsed["sent"],
            "connected": parsed["connected"],
            "connect_failures": parsed["connect_failures"],
            "connect_failure_kinds": parsed["connect_failure_kinds"],
            "p50_ms": ms["p50"],
            "p90_ms": ms["p90"],
            "p99_ms": ms["p99"],
            "p999_ms": ms["p999"],
            "max_ms": ms["max"],
            "errors": parsed["errors"],
            "error_samples": parsed["error_samples"],
            "cpu": cpu,
            "server_us_per_msg": server_us_per_item(cpu, parsed["acked"]),
            "core1": core1_split(cpu, parsed["acked"]),
        }

    def ws_round(self, spec: ServerSpec) -> dict[str, Any]:
        with self.redis_for(spec, f"WS {spec.name}{self.tag}"):
            return self._ws_round(spec)

    def _ws_round(self, spec: ServerSpec) -> dict[str, Any]:
        server = self.start_server(spec, f"WS {spec.name}{self.tag}")
        try:
            self.wait_replicas(spec, server)
            result = self.ws_load(server.port, server.proc.pid)
            result["ready_s"] = server.ready_s
            if spec.is_service:
                assert self.redis is not None
                stream = Keys(SERVICE_KEY_PREFIX).readings
                result["checks"] = {"stream_entries": self.redis.client().xlen(stream)}
                self.replica_checks(f"WS {spec.name}{self.tag}", result["checks"])
            result.update(self.stop_server(server, f"WS {spec.name}{self.tag}"))
        finally:
            self.procs.stop(server.proc)
        errors = sum(result["errors"].values()) + result["connect_failures"]
        if errors:
            self.problems.append(
                f"WS {spec.name}{self.tag}: {result['connect_failures']} failed connections "
                f"{result['connect_failure_kinds']}, errors {result['errors']}, "
                f"samples {result['error_samples']}"
            )
        if not result["acked"]:
            self.problems.append(f"WS {spec.name}{self.tag}: no batch was acknowledged")
        return result

    # ---- idle sockets

    def idle(self, spec: ServerSpec) -> dict[str, Any]:
        self.flush_redis()
        wanted = self.args.idle_connections
        limit = nofile_hard_limit()
        if wanted + 200 > limit:
            self.notes.append(
                f"idle connections cut from {wanted} to {limit - 200} "
                f"(open-files hard limit {limit})"
            )
            wanted = limit - 200
        server = self.start_server(spec, f"idle WS {spec.name}{self.tag}")
        result: dict[str, Any] = {"requested": wanted}
        try:
            time.sleep(1.0)
            before = rss_kb(server.proc.pid)
            argv = pinned(
                LOAD_CORE,
                [
                    self.node(),
                    str(BENCH / "ws" / "idle.js"),
                    "--url",
                    f"ws://127.0.0.1:{server.port}/ingestion/ws",
                    "--connections",
                    str(wanted),
                    "--devices",
                    str(self.devices_file),
                ],
            )
            client = self.procs.start("ws-idle", argv, stdout_pipe=True, stdin_pipe=True)
            try:
                ready = self._idle_line(client, "PULSECAL_IDLE_READY ", timeout=180)
                time.sleep(self.args.idle_settle)
                after = rss_kb(server.proc.pid)
                assert client.popen.stdin is not None
                client.popen.stdin.write("status\n")
                client.popen.stdin.flush()
                status = self._idle_line(client, "PULSECAL_IDLE_STATUS ", timeout=30)
                server_alive = server.proc.alive()
            finally:
                self.procs.stop(client)
            opened = int(status["open_now"])
            result.update(
                {
                    "rss_before_kb": before,
                    "rss_after_kb": after,
                    "opened": ready["opened"],
                    "failed": ready["failed"],
                    "failure_kinds": ready["failure_kinds"],
                    "open_after_settle": opened,
                    "closed_by_server": status["closed_by_server"],
                    "open_seconds": ready["seconds"],
                    "per_connection_kb": round((after - before) / opened, 2) if opened else None,
                    "server_alive": server_alive,
                }
            )
            if ready["failed"] or status["closed_by_server"]:
                self.problems.append(
                    f"idle WS {spec.name}: {ready['failed']} connections failed "
                    f"{ready['failure_kinds']}, {status['closed_by_server']} closed by the server"
                )
            result.update(self.stop_server(server, f"idle WS {spec.name}{self.tag}"))
        finally:
            self.procs.stop(server.proc)
        return result

    @staticmethod
    def _idle_line(client: Proc, prefix: str, timeout: float) -> dict[str, Any]:
        assert client.popen.stdout is not None
        with watchdog(client, timeout):
            for line in client.popen.stdout:
                if line.startswith(prefix):
                    parsed: dict[str, Any] = json.loads(line.removeprefix(prefix))
                    return parsed
        raise HarnessError(f"idle.js gave no {prefix.strip()} line:\n{client.log_tail()}")


# --------------------------------------------------------------------------- report


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def server_us_per_item(cpu: Mapping[str, Any], items: int) -> float | None:
    """Server CPU time per request or message over the window: capacity, whatever the load."""
    pct = cpu.get("process_cpu_pct", {}).get("server")
    wall = cpu.get("wall_s")
    if pct is None or not wall or not items:
        return None
    return round(float(pct) / 100 * float(wall) / items * 1e6, 1)


# What runs on core 1 beside the server's core: the load generator, the harness's Redis, its
# replica (replicated runs only) and the trace sink the service exports to.
CORE1_GROUPS = ("loadgen", "redis", "redis_replica", "otlp_sink")


def core1_split(cpu: Mapping[str, Any], items: int) -> dict[str, Any]:
    """How core 1's time divided over the window: per process group its CPU seconds, its
    share of the core, and its CPU per request or message; the rest of the busy time
    (interrupts and softirqs, where loopback networking runs, and other processes)."""
    wall = cpu.get("wall_s")
    if not wall:
        return {}
    seconds = {**cpu.get("process_cpu_s", {}), **cpu.get("background_cpu_s", {})}
    groups = {
        name: {
            "cpu_s": round(seconds[name], 3),
            "pct_of_core": round(100.0 * seconds[name] / wall, 1),
            "us_per_item": round(seconds[name] / items * 1e6, 1) if items else None,
        }
        for name in CORE1_GROUPS
        if name in seconds
    }
    busy = cpu.get("core_busy_pct", {}).get(LOAD_CORE)
    out: dict[str, Any] = {"wall_s": wall, "groups": groups, "core_busy_pct": busy}
    if busy is not None:
        used = sum(g["pct_of_core"] for g in groups.values())
        out["rest_pct"] = round(max(busy - used, 0.0), 1)
        out["idle_pct"] = round(100.0 - busy, 1)
    return out


def median_core1(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per figure of ``core1_split``, the median over the rounds that have it."""
    splits = [r["core1"] for r in rounds if r.get("core1")]

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 3) if present else None

    names = [n for n in CORE1_GROUPS if any(n in s["groups"] for s in splits)]
    return {
        "groups": {
            name: {
                key: med([s["groups"][name].get(key) for s in splits if name in s["groups"]])
                for key in ("cpu_s", "pct_of_core", "us_per_item")
            }
            for name in names
        },
        **{
            key: med([s.get(key) for s in splits])
            for key in ("wall_s", "core_busy_pct", "rest_pct", "idle_pct")
        },
    }


def summarize_rounds(rounds: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: median_of(rounds, k) for k in keys}
    out["server_cpu_pct"] = (
        statistics.median(r["cpu"]["process_cpu_pct"]["server"] for r in rounds if r.get("cpu"))
        if any(r.get("cpu") for r in rounds)
        else None
    )
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def verdict(name: str, value: float | None) -> str:
    op, target = TARGETS[name]
    if value is None:
        return "n/a"
    ok = value >= target if op == ">=" else value <= target
    return "PASS" if ok else "MISS"


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break

    def run(argv: list[str]) -> str:
        """First line of what the command prints (``wrk --version`` exits 1)."""
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
        except OSError:
            return ""
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else ""

    def git(tree: Path) -> tuple[str, bool]:
        done = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 and "not a git repository" in done.stderr:
            return "not a git checkout", False
        commit = done.stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--", "service", "shared"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return commit or "none (no commit yet)", bool(status)

    commit, dirty = git(ROOT)
    service_tree = (args.service_src or ROOT).resolve()
    service_commit, service_dirty = git(service_tree)
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "service_source": str(service_tree),
        "service_commit": service_commit,
        "service_dirty": service_dirty,
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "node": run(["node", "--version"]),
        "wrk": run(["wrk", "--version"]).split(" [")[0],
        "redis": run(["redis-server", "--version"]).split(" sha=")[0],
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "rounds": args.rounds,
            "wrk_threads": args.wrk_threads,
            "ws_procs": args.ws_procs,
            "devices": args.devices,
            "samples_per_batch": args.samples,
            "idle_connections": args.idle_connections,
        },
    }


def run_label(name: str, index: int, rounds: Sequence[Mapping[str, Any]]) -> str:
    label = name if len(rounds) == 1 else f"{name} #{index + 1}"
    attempt = rounds[index].get("attempt", 1)
    return label if attempt == 1 else f"{label} (attempt {attempt})"


def load_table(data: dict[str, Any], kind: str) -> list[str]:
    """One row per server and round (and the median when rounds repeat)."""
    http = kind == "http"
    rate, per = ("rps", "server_us_per_req") if http else ("rate", "server_us_per_msg")
    lines = [
        f"| server | {'req/s' if http else 'acked msg/s'} | p50 ms | p99 ms | p99.9 ms | errors "
        f"| server CPU % | server CPU us per {'request' if http else 'message'} "
        f"| {'wrk' if http else 'node'} CPU % | Redis CPU % | core 0 busy % | core 1 busy % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rounds in data[kind].items():
        for i, r in enumerate(rounds):
            procs = r["cpu"].get("process_cpu_pct", {})
            cores = r["cpu"].get("core_busy_pct", {})
            if http:
                errors = r["non_2xx"] + sum(r["socket_errors"].values())
            else:
                errors = sum(r["errors"].values()) + r["connect_failures"]
            label = run_label(name, i, rounds)
            lines.append(
                f"| {label} | {fmt(r[rate], 0)} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} "
                f"| {fmt(r['p999_ms'])} | {errors} | {fmt(procs.get('server'), 0)} "
                f"| {fmt(r.get(per), 1)} | {fmt(procs.get('loadgen'), 0)} "
                f"| {fmt(procs.get('redis'), 0)} | {fmt(cores.get(SERVER_CORE), 0)} "
                f"| {fmt(cores.get(LOAD_CORE), 0)} |"
            )
        if len(rounds) > 1:
            m = data["medians"][kind][name]
            lines.append(
                f"| **{name} median** | **{fmt(m[rate], 0)}** | {fmt(m['p50_ms'])} "
                f"| {fmt(m['p99_ms'])} | {fmt(m['p999_ms'])} | | {fmt(m['server_cpu_pct'], 0)} "
                f"| {fmt(m.get(per), 1)} | | | | |"
            )
    if http:
        lines.append(
            "\nerrors = non-2xx responses + socket errors (connect, read, write, timeout)."
        )
    else:
        lines.append(
            "\nerrors = failed connections + error replies + unexpected closes + mismatched or "
            "unanswered acks."
        )
    return lines


def core1_table(data: dict[str, Any], kind: str) -> list[str]:
    """How core 1 divided between the load generator, Redis (and its replica) per run."""
    http = kind == "http"
    item = "request" if http else "message"
    lines = [
        f"Core {LOAD_CORE} over the measured window: CPU seconds and share of the core per "
        "process group; rest = the core's other busy time (interrupts and softirqs, where "
        "loopback networking runs, and processes the harness did not start).",
        "",
        f"| server | {'wrk' if http else 'node'} | Redis | Redis replica | trace sink | rest % "
        f"| idle % | Redis (+ replica) CPU us per {item} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(label: str, split: Mapping[str, Any], bold: bool = False) -> str:
        groups = split.get("groups", {})

        def cell(name: str) -> str:
            g = groups.get(name)
            if g is None:
                return "-"
            return f"{fmt(g['cpu_s'])} s, {fmt(g['pct_of_core'], 0)} %"

        name = f"**{label}**" if bold else label
        return (
            f"| {name} | {cell('loadgen')} | {cell('redis')} | {cell('redis_replica')} "
            f"| {cell('otlp_sink')} | {fmt(split.get('rest_pct'), 0)} "
            f"| {fmt(split.get('idle_pct'), 0)} | {fmt(redis_us_per_item(split), 1)} |"
        )

    for name, rounds in data[kind].items():
        for i, r in enumerate(rounds):
            lines.append(row(run_label(name, i, rounds), r.get("core1") or {}))
        if len(rounds) > 1:
            median = data["core1_split"][kind].get(name, {})
            lines.append(row(f"{name} median", median, bold=True))
    return lines


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    s = m["settings"]
    lines = [
        f"# PulseCal benchmark — {m['date']}",
        "",
        f"- Command: `{m['command']}`",
        f"- Git commit: `{m['git_commit']}`"
        + (" (service/ or shared/ has uncommitted changes)" if m["git_dirty"] else ""),
        f"- Service under test: `{m['service_source']}` at `{m['service_commit']}`"
        + (" plus uncommitted changes in service/ or shared/" if m["service_dirty"] else ""),
        f"- CPU: {m['cpu_model']}, {m['cpus']} cores; kernel {m['kernel']}; Python {m['python']}; "
        f"aiohttp {m['aiohttp']}; node {m['node']}; {m['wrk']}; {m['redis']}",
        f"- Pinning: server under test on core {SERVER_CORE}; wrk / node load generator and the "
        f"throwaway Redis on core {LOAD_CORE}; Postgres ({data['database']}) unpinned — only "
        "read for device tokens.",
        f"- Load: {s['connections']} connections, {s['warmup_s']:g} s warm-up then "
        f"{s['duration_s']:g} s measured, {s['rounds']} round(s) (medians shown); wrk "
        f"{s['wrk_threads']} thread(s), load.js {s['ws_procs']} process(es); batches of "
        f"{s['samples_per_batch']} samples at 50 Hz (~1.1 KB JSON), a unique seq per batch, "
        f"spread over {s['devices']} devices with their own bearer tokens.",
        "",
        "## Verdict",
        "",
        "| ratio | value | target | |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, value in data["ratios"].items():
        op, target = TARGETS[name]
        lines.append(f"| {name} | {fmt(value, 3)} | {op} {target:g} | {verdict(name, value)} |")
    lines += ["", "Without targets:", "", "| ratio | value |", "| --- | ---: |"]
    for name, value in data["ratios_info"].items():
        lines.append(f"| {name} | {fmt(value, 3)} |")
    lines.append(
        "\nThe `cpu_per_*` ratios divide the servers' CPU time per request or message: what the "
        "throughput ratio would be if each server had its core to itself and the load "
        "generator were free. When they disagree with the throughput ratios, the generator "
        "or the machine limited a run."
    )
    lines.append("")
    if data["problems"]:
        lines.append("**FLAGGED: the run had errors (see Problems); do not trust these ratios.**")
    elif data["warnings"]:
        lines.append(
            f"**{len(data['warnings'])} warning(s): the machine was not quiet or a server "
            "misbehaved (see Warnings); compare with a run on an idle machine.**"
        )
    else:
        lines.append("Clean run: no errors, no other load on the machine.")
    lines += ["", "## HTTP — POST /ingestion/ppg (wrk)", ""]
    lines += load_table(data, "http")
    if data["http"]:
        lines += ["", *core1_table(data, "http")]
    if data["http_checks"]:
        lines += ["", "What the servers did (warm-up + measured run, last round):", ""]
        for name, checks in data["http_checks"].items():
            lines.append(f"- {name}: " + ", ".join(f"{k} {fmt(v)}" for k, v in checks.items()))
    lines += ["", "## WebSocket — /ingestion/ws (load.js, 1 batch in flight per socket)", ""]
    lines += load_table(data, "ws")
    if data["ws"]:
        lines += ["", *core1_table(data, "ws")]
    if data.get("replicated"):
        lines += ["", *render_replicated(data["replicated"])]
    if data["idle"]:
        lines += ["", "## Idle WebSocket connections (memory)", ""]
        lines += [
            "| server | open | failed | RSS before MB | RSS after MB | KB per connection |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in data["idle"].items():
            lines.append(
                f"| {name} | {fmt(r.get('open_after_settle'))} | {fmt(r.get('failed'))} "
                f"| {fmt(r.get('rss_before_kb', 0) / 1024, 1)} "
                f"| {fmt(r.get('rss_after_kb', 0) / 1024, 1)} "
                f"| {fmt(r.get('per_connection_kb'), 1)} |"
            )
    lines += ["", "## Load generator headroom", ""]
    lines += [data["headroom"]]
    if data["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    if data["warnings"]:
        lines += ["", "## Warnings (a busy machine: treat these figures with care)", ""]
        lines += bullets(data["warnings"])
    lines += ["", "## Problems", ""]
    if data["problems"]:
        lines.append("**FLAGGED: this run had errors; its figures are not trustworthy.**")
        lines.append("")
        lines += bullets(data["problems"])
    else:
        lines.append("None: no non-2xx responses, socket errors, WebSocket errors or crashes.")
    return "\n".join(lines) + "\n"


def render_replicated(rep: Mapping[str, Any]) -> list[str]:
    """The replicated-ack section: ratios, and the server CPU a replicated ack adds."""
    http, ws = rep["http"], rep["ws"]
    lines = [
        "## Replicated acks — service_replicated",
        "",
        "`service_replicated` is the service with `ACK_MODE=replicated ACK_REPLICAS=1` "
        "(`ACK_TIMEOUT` at its default): every write is followed by `WAIT 1 <timeout>` and "
        "acknowledged only once a replica has it. The replica is a second throwaway "
        f"redis-server on core {LOAD_CORE}, started and synced for these runs only; readiness "
        "(its `redis-replication` check) passed before each was measured. Its rows are in "
        "the HTTP and WebSocket tables above; a 503 or error reply for a write the replica "
        "did not confirm counts as an error there.",
        "",
        "| ratio (medians) | value |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {fmt(value, 3)} |" for name, value in rep["ratios"].items()]

    def signed(value: float | None) -> str:
        return "-" if value is None else f"{value:+,.1f}"

    lines += [
        "",
        "| CPU, medians | per HTTP request | per WS message |",
        "| --- | ---: | ---: |",
        f"| server, service_replicated (us) | {fmt(http['server_us_per_req'], 1)} "
        f"| {fmt(ws['server_us_per_msg'], 1)} |",
        f"| server, against primary mode (us) "
        f"| {signed(http['extra_server_us_per_req_over_service'])} "
        f"| {signed(ws['extra_server_us_per_msg_over_service'])} |",
        f"| Redis primary + replica, service_replicated (us) "
        f"| {fmt(http['redis_us_per_req'], 1)} | {fmt(ws['redis_us_per_msg'], 1)} |",
        f"| Redis, service in primary mode (us) | {fmt(http['service_redis_us_per_req'], 1)} "
        f"| {fmt(ws['service_redis_us_per_msg'], 1)} |",
    ]
    return lines


def bullets(items: Sequence[str]) -> list[str]:
    """Markdown list items; a multi-line item's further lines go in a code block."""
    out: list[str] = []
    for item in items:
        first, *rest = item.splitlines()
        out.append(f"- {first}")
        if rest:
            out += ["", "  ```", *[f"  {x}" for x in rest], "  ```", ""]
    return out


def headroom(data: dict[str, Any]) -> str:
    """Per run: was the server's core saturated, did the load core have room, was it quiet?"""
    rows = [
        "| run | server % of core 0 | load generator % | Redis % | core 1 busy % "
        "| other processes % | steal % (all cores) | reading |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for kind in ("http", "ws"):
        for name, rounds in data[kind].items():
            for i, r in enumerate(rounds):
                cpu = r.get("cpu") or {}
                procs = cpu.get("process_cpu_pct", {})
                server, load = procs.get("server"), procs.get("loadgen")
                load_core = cpu.get("core_busy_pct", {}).get(LOAD_CORE)
                other = cpu.get("other_cpu_pct")
                reading: list[str] = []
                if server is not None and server < 90:
                    reading.append("server core not saturated")
                own = sum(procs.get(g) or 0.0 for g in ("loadgen", "redis", "redis_replica"))
                if own > 90:
                    reading.append(
                        "load generator + Redis fill core 1: the generator may be the bottleneck"
                    )
                if other is not None and other > 20:
                    reading.append("machine busy with other work")
                if sum(cpu.get("steal_pct", {}).values()) > 10:
                    reading.append("the hypervisor took CPU (steal)")
                label = f"{kind.upper()} {run_label(name, i, rounds)}"
                rows.append(
                    f"| {label} | {fmt(server, 0)} | {fmt(load, 0)} "
                    f"| {fmt(procs.get('redis'), 0)} | {fmt(load_core, 0)} | {fmt(other, 0)} "
                    f"| {fmt(sum(cpu.get('steal_pct', {}).values()), 0)} "
                    f"| {'; '.join(reading) or 'ok'} |"
                )
    return "\n".join(rows) if len(rows) > 2 else "(no load runs)"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run")
    p.add_argument("--connections", type=int, default=64, help="HTTP and WS connections")
    p.add_argument(
        "--rounds", type=int, default=3, help="repeat each comparison, report medians (3)"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="seconds to wait before each server for other processes to leave the cores",
    )
    p.add_argument(
        "--retry-disturbed",
        type=int,
        default=2,
        help="measure again (up to N times) when other processes disturbed a run; the least\n"
        "disturbed attempt is kept",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=20.0,
        help="percent of a core other processes may use before a run is called disturbed",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 s runs, 1 s warm-up, 1 round, no retries, 1000 idle sockets",
    )
    p.add_argument("--devices", type=int, default=32, help="devices registered for the load")
    p.add_argument("--samples", type=int, default=50, help="samples per batch")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--ws-procs", type=int, default=1, help="node processes for WS load")
    p.add_argument("--idle-connections", type=int, default=10_000)
    p.add_argument(
        "--idle-settle",
        type=float,
        default=3.0,
        help="seconds between the last idle socket opening and the RSS reading",
    )
    p.add_argument("--only", default="http,ws,idle", help="comma list of http, ws, idle")
    p.add_argument(
        "--no-service", action="store_true", help="peers only (before the service exists)"
    )
    p.add_argument(
        "--no-replicated",
        action="store_true",
        help="skip service_replicated (the service with ACK_MODE=replicated ACK_REPLICAS=1\n"
        "against the harness's Redis and a replica of it)",
    )
    p.add_argument(
        "--lean-ws-peer",
        action="store_true",
        help="also run bench/peers/bare_ws_lean.py in the WS comparison (an experiment:\n"
        "bare_ws with aiohttp's per-message receive/send machinery cut short)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="Postgres to create the throwaway database in",
    )
    p.add_argument("--output-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--service-src",
        type=Path,
        default=None,
        help="run pulsecal-service/-admin from this checkout (e.g. a `git worktree` of another\n"
        "commit) instead of the installed working tree",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a variable of the service (repeatable), e.g. TRACING_ENABLED=false to see\n"
        "what one feature costs; the run is then not the reference configuration",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 3.0)
        args.rounds = 1
        args.retry_disturbed = 0
        args.wait_quiet = min(args.wait_quiet, 5.0)
        args.warmup = min(args.warmup, 1.0)
        args.idle_connections = min(args.idle_connections, 1000)
        args.idle_settle = min(args.idle_settle, 1.0)
        args.devices = min(args.devices, 8)
    return args


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pulsecal-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    for tool in ("wrk", "taskset", "redis-server"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not on PATH", file=sys.stderr)
            return 2
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    py = sys.executable
    service_bin = Path(py).with_name("pulsecal-service")
    with_service = not args.no_service
    source = args.service_src or ROOT
    if with_service and not (
        service_bin.exists() and (source / "service" / "__main__.py").exists()
    ):
        print("bench: pulsecal-service is not installed; measuring the peers only", file=sys.stderr)
        with_service = False

    with workspace() as workdir:
        bench = Bench(args, workdir)
        database: Database | None = None
        data: dict[str, Any] = {"machine": machine_info(args)}
        try:
            bench.redis = start_redis(bench.procs, workdir)
            # Tracing is on in the service, at its default sampling, exporting to this sink.
            sink_port = free_port()
            bench.sink = bench.procs.start(
                "otlp-sink",
                pinned(LOAD_CORE, [py, str(PEERS / "otlp_sink.py"), str(sink_port)]),
            )
            if with_service:
                database = prepare_database(bench.procs, workdir, args.database_url)
                register_devices(database.url, args.devices, bench.devices_file, args.service_src)
                data["database"] = database.how
            else:
                bench.devices_file.write_text(
                    "".join(f"bench-{i:03d} pct_dummy\n" for i in range(args.devices))
                )
                data["database"] = "not used"
            log_conv = workdir / "logs-conventional"
            log_conv.mkdir()
            log_service = workdir / "logs-service"
            log_service.mkdir()
            redis_url = bench.redis.url
            bare_http = ServerSpec("bare_http", (py, str(PEERS / "bare_http.py")))
            bare_ws = ServerSpec("bare_ws", (py, str(PEERS / "bare_ws.py")))
            conventional = ServerSpec(
                "conventional",
                (py, str(PEERS / "conventional.py")),
                (("REDIS_URL", redis_url), ("LOG_DIR", str(log_conv))),
            )
            service = ServerSpec(
                "service",
                (str(service_bin),),
                (
                    ("REDIS_URL", redis_url),
                    ("DATABASE_URL", database.url if database else ""),
                    ("POD_NAME", "bench"),
                    ("REDIS_KEY_PREFIX", SERVICE_KEY_PREFIX),
                    ("READINGS_MAX_BACKLOG", HUGE_BACKLOG),
                    ("LOG_DIR", str(log_service)),
                    # Everything on, as in production: the daily files beside stdout.
                    ("ENABLE_FILE_LOGGING", "true"),
                    # Limiting stays on (its GCRA runs in every write) but must not refuse
                    # the harness's 32 devices, each far above a real device's 1000/min.
                    ("RATE_LIMIT_INGEST_MAX", "10000000"),
                    ("TRACING_ENABLED", "true"),
                    (
                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                        f"http://127.0.0.1:{sink_port}/v1/traces",
                    ),
                    ("ENVIRONMENT", "production"),
                    *service_env(args.service_src).items(),
                    *(tuple(v.split("=", 1)) for v in args.service_env),
                ),
            )
            # The same service acking once one replica has each write (WAIT 1 after it,
            # ACK_TIMEOUT at its default); redis_for() starts the replica for its rounds.
            replicated = ServerSpec(
                "service_replicated",
                service.argv,
                (*service.env, ("ACK_MODE", "replicated"), ("ACK_REPLICAS", "1")),
                replicated=True,
            )
            services = [service] if with_service else []
            if with_service and not args.no_replicated:
                services.append(replicated)
            http_specs = [bare_http, *services, conventional]
            ws_specs = [bare_ws, *services]
            if args.lean_ws_peer:
                ws_specs.append(ServerSpec("bare_ws_lean", (py, str(PEERS / "bare_ws_lean.py"))))

            data["http"] = {s.name: [] for s in http_specs} if "http" in parts else {}
            data["ws"] = {s.name: [] for s in ws_specs} if "ws" in parts else {}
            data["idle"] = {}
            for rnd in range(args.rounds):
                tag = f"round {rnd + 1}/{args.rounds}"
                bench.tag = f" ({tag})" if args.rounds > 1 else ""
                if "http" in parts:
                    for spec in http_specs:
                        print(f"bench: {tag}: HTTP {spec.name}", file=sys.stderr, flush=True)
                        data["http"][spec.name].append(bench.measure("HTTP", spec))
                if "ws" in parts:
                    for spec in ws_specs:
                        print(f"bench: {tag}: WS {spec.name}", file=sys.stderr, flush=True)
                        data["ws"][spec.name].append(bench.measure("WS", spec))
            bench.tag = ""
            if "idle" in parts:
                for spec in [s for s in ws_specs if not s.replicated]:
                    print(f"bench: idle WS {spec.name}", file=sys.stderr, flush=True)
                    data["idle"][spec.name] = bench.idle(spec)
        except HarnessError as e:
            bench.problems.append(f"harness stopped: {e}")
            bench.harness_failed = True
            print(f"bench: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("bench: interrupted; stopping everything", file=sys.stderr)
            bench.procs.stop_all()
            if database is not None:
                with contextlib.suppress(psycopg.Error):
                    database.drop()
            return 130
        finally:
            bench.procs.stop_all()
            keep_logs(workdir, args.output_dir / "logs")
        if database is not None:
            try:
                database.drop()
            except psycopg.Error as e:
                bench.notes.append(f"could not drop the throwaway database: {e}")

        return finish(args, bench, data)


def keep_logs(workdir: Path, dest: Path, cap: int = 20 << 20) -> None:
    """Copy the servers' and tools' output (the last ``cap`` bytes of each) for later reading."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for log in sorted(workdir.glob("*.log")):
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - cap))
            (dest / log.name).write_bytes(f.read())


def redis_us_per_item(split: Mapping[str, Any]) -> float | None:
    """Redis CPU per request or message, the replica's included, from a core-1 split."""
    groups = split.get("groups", {})
    values = [groups[n].get("us_per_item") for n in ("redis", "redis_replica") if n in groups]
    if not values or None in values:
        return None
    return round(float(sum(v for v in values if v is not None)), 1)


def replicated_summary(
    http_med: Mapping[str, Mapping[str, Any]],
    ws_med: Mapping[str, Mapping[str, Any]],
    core1: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, Any]:
    """service_replicated against the service in primary mode and the bare baseline (medians)."""

    def get(table: Mapping[str, Mapping[str, Any]], name: str, key: str) -> float | None:
        value = table.get(name, {}).get(key)
        return float(value) if value is not None else None

    def extra(a: float | None, b: float | None) -> float | None:
        return round(a - b, 1) if a is not None and b is not None else None

    rep = "service_replicated"
    http_us = get(http_med, rep, "server_us_per_req")
    ws_us = get(ws_med, rep, "server_us_per_msg")
    redis_us = {
        (kind, name): redis_us_per_item(core1.get(kind, {}).get(name, {}))
        for kind in ("http", "ws")
        for name in ("service", rep)
    }
    return {
        "ratios": {
            "http_acked_rps_replicated_over_service": ratio(
                get(http_med, rep, "acked_rps"), get(http_med, "service", "acked_rps")
            ),
            "http_acked_rps_replicated_over_bare": ratio(
                get(http_med, rep, "acked_rps"), get(http_med, "bare_http", "acked_rps")
            ),
            "http_cpu_per_req_service_over_replicated": ratio(
                get(http_med, "service", "server_us_per_req"), http_us
            ),
            "http_cpu_per_req_bare_over_replicated": ratio(
                get(http_med, "bare_http", "server_us_per_req"), http_us
            ),
            "ws_rate_replicated_over_service": ratio(
                get(ws_med, rep, "rate"), get(ws_med, "service", "rate")
            ),
            "ws_rate_replicated_over_bare": ratio(
                get(ws_med, rep, "rate"), get(ws_med, "bare_ws", "rate")
            ),
            "ws_cpu_per_msg_service_over_replicated": ratio(
                get(ws_med, "service", "server_us_per_msg"), ws_us
            ),
            "ws_cpu_per_msg_bare_over_replicated": ratio(
                get(ws_med, "bare_ws", "server_us_per_msg"), ws_us
            ),
        },
        "http": {
            "acked_rps": get(http_med, rep, "acked_rps"),
            "server_us_per_req": http_us,
            "extra_server_us_per_req_over_service": extra(
                http_us, get(http_med, "service", "server_us_per_req")
            ),
            # Primary + replica, against the primary alone for the service in primary mode.
            "redis_us_per_req": redis_us["http", rep],
            "service_redis_us_per_req": redis_us["http", "service"],
        },
        "ws": {
            "rate": get(ws_med, rep, "rate"),
            "server_us_per_msg": ws_us,
            "extra_server_us_per_msg_over_service": extra(
                ws_us, get(ws_med, "service", "server_us_per_msg")
            ),
            "redis_us_per_msg": redis_us["ws", rep],
            "service_redis_us_per_msg": redis_us["ws", "service"],
        },
    }


def finish(args: argparse.Namespace, bench: Bench, data: dict[str, Any]) -> int:
    data.setdefault("database", "not prepared")
    data.setdefault("http", {})
    data.setdefault("ws", {})
    data.setdefault("idle", {})
    http_keys = ("rps", "p50_ms", "p99_ms", "p999_ms", "server_us_per_req", "acked_rps")
    http_med = {n: summarize_rounds(r, http_keys) for n, r in data["http"].items() if r}
    ws_med = {
        n: summarize_rounds(r, ("rate", "p50_ms", "p99_ms", "p999_ms", "server_us_per_msg"))
        for n, r in data["ws"].items()
        if r
    }

    def get(table: dict[str, Any], name: str, key: str) -> float | None:
        value = table.get(name, {}).get(key)
        return float(value) if value is not None else None

    data["medians"] = {"http": http_med, "ws": ws_med}
    data["core1_split"] = {
        kind: {n: median_core1(r) for n, r in data[kind].items() if r} for kind in ("http", "ws")
    }
    data["ratios"] = {
        "http_rps_service_over_bare": ratio(
            get(http_med, "service", "rps"), get(http_med, "bare_http", "rps")
        ),
        "http_rps_service_over_conventional": ratio(
            get(http_med, "service", "rps"), get(http_med, "conventional", "rps")
        ),
        "http_p99_service_over_bare": ratio(
            get(http_med, "service", "p99_ms"), get(http_med, "bare_http", "p99_ms")
        ),
        "ws_rate_service_over_bare": ratio(
            get(ws_med, "service", "rate"), get(ws_med, "bare_ws", "rate")
        ),
    }
    # Informational ratio, no target: the conventional design against the bare baseline.
    data["ratios_info"] = {
        "http_rps_conventional_over_bare": ratio(
            get(http_med, "conventional", "rps"), get(http_med, "bare_http", "rps")
        ),
        # Server CPU per request, bare over service: the throughput ratio the server alone
        # would reach, unaffected by a load generator or machine that limits both runs.
        "http_cpu_per_req_bare_over_service": ratio(
            get(http_med, "bare_http", "server_us_per_req"),
            get(http_med, "service", "server_us_per_req"),
        ),
        "http_cpu_per_req_conventional_over_service": ratio(
            get(http_med, "conventional", "server_us_per_req"),
            get(http_med, "service", "server_us_per_req"),
        ),
        "ws_cpu_per_msg_bare_over_service": ratio(
            get(ws_med, "bare_ws", "server_us_per_msg"),
            get(ws_med, "service", "server_us_per_msg"),
        ),
    }
    if "service_replicated" in http_med or "service_replicated" in ws_med:
        data["replicated"] = replicated_summary(http_med, ws_med, data["core1_split"])
    data["http_checks"] = {
        n: r[-1]["checks"] for n, r in data["http"].items() if r and r[-1].get("checks")
    }
    data["problems"] = bench.problems
    data["warnings"] = bench.warnings
    data["notes"] = bench.notes
    data["headroom"] = headroom(data)
    report = render(data)
    # The raw wrk text stays in the JSON only.
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "latest.md").write_text(report)
    (args.output_dir / "latest.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(report)
    if bench.harness_failed:
        return 2
    if bench.problems:
        return 1
    missed = [n for n, v in data["ratios"].items() if verdict(n, v) == "MISS"]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
