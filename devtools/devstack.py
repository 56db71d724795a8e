"""``python -m devtools.devstack`` (``make run``): the whole stack on this machine, one command.

Redis and Postgres come from ``REDIS_URL`` / ``DATABASE_URL`` when they answer; otherwise a
throwaway server of each is started in a temporary directory. Then the schema is migrated,
demo devices are registered, ``pulsecal-service`` is started and ``pulsecal-sim`` streams to
it. When ``prometheus`` is on PATH, one scrapes every sidecar and evaluates ops/alerts.yml.
Ctrl-C or SIGTERM stops everything in reverse order and removes the temporary directory.
"""

import argparse
import asyncio
import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import psycopg
import redis.asyncio
import redis.exceptions

from shared.keys import Keys
from shared.settings import DevStackSettings, load_settings_or_exit

__all__ = ("main",)

_PROBE_TIMEOUT = 2.0
_TAIL_LINES = 25
# Where Debian (and RHEL, and source builds) put the server binaries, off PATH.
_POSTGRES_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")
# The project's alert rules: devtools/ is installed editable, beside ops/.
ALERT_RULES = Path(__file__).resolve().parent.parent / "ops" / "alerts.yml"
_PROMETHEUS_PORT = 9090  # the conventional one, when it is free
_PROMETHEUS_INTERVAL = "2s"  # scrape and rule evaluation
_PROMETHEUS_NAMESPACE = "devstack"  # the `namespace` label the alerts group by


class StackError(Exception):
    """Something the developer must fix; the message says what."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Options:
    devices: int
    port: int | None
    duration: float
    ws_fraction: float
    rate_hz: float
    run_sim: bool
    keep: bool
    startup_timeout: float
    prometheus: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ScrapeTarget:
    """A sidecar's /metrics for the local Prometheus: ``job`` and ``pod`` as in Kubernetes."""

    address: str  # host:port
    job: str  # pulsecal-api or pulsecal-worker
    pod: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessSpec:
    """A long-running process of the stack, started with the stack's environment."""

    name: str
    argv: list[str]
    stop_timeout: float = 10.0
    # Polled until it answers 200 before the next process starts; None to not wait.
    ready_url: str | None = None
    # Variables of its own, over the stack's environment.
    env: dict[str, str] = field(default_factory=dict)
    # Lines for the "up" summary, e.g. where to look at it.
    announce: tuple[str, ...] = ()
    # A sidecar: what Prometheus scrapes, as ops/prometheus.yml labels it.
    scrape: ScrapeTarget | None = None


def _extra_processes(*, bin_dir: Path, settings: DevStackSettings) -> list[ProcessSpec]:
    """EXTRA PROCESSES: the ones that run beside the service (the sidecar, the worker).

    They start once Redis and Postgres are ready and the schema is migrated, before the
    service, and stop after it, so they see everything the service wrote.

    The sidecar shares the service's pod name (the host name), so it reads the service's
    telemetry; it is ready when it answers its liveness probe (its full /health says 503
    until the service's first heartbeat). A busy ``SIDECAR_PORT`` is replaced by a free one.
    """
    port = settings.sidecar_port
    if not _port_is_free(port):
        port = _free_port()
    url = f"http://127.0.0.1:{port}"
    metrics_note = "" if settings.metrics_enabled else "  (METRICS_ENABLED=false: 404)"
    return [
        ProcessSpec(
            name="sidecar",
            argv=[_script(bin_dir, "pulsecal-sidecar")],
            ready_url=f"{url}/health/liveness",
            env={"SIDECAR_PORT": str(port)},
            announce=(
                f"dashboard {url}/  (health of every component, traffic charts)",
                f"metrics   {url}/metrics{metrics_note}  (and {url}/health)",
            ),
            scrape=ScrapeTarget(address=f"127.0.0.1:{port}", job="pulsecal-api", pod=settings.pod),
        ),
        *_worker_processes(bin_dir=bin_dir, settings=settings),
    ]


def _worker_processes(*, bin_dir: Path, settings: DevStackSettings) -> list[ProcessSpec]:
    """The analysis service, the worker and the worker pod's own sidecar.

    The worker is a pod of its own (``<pod>-worker``): its telemetry and heartbeat go to its
    sidecar, as in Kubernetes. ``AI_SERVICE_URL``, when set, replaces the reference analysis
    service. Busy default ports (8000, ``WORKER_PORT``) are replaced by free ones.
    """
    specs: list[ProcessSpec] = []
    ai_url = settings.ai_service_url
    if ai_url is None:
        ai_port = 8000 if _port_is_free(8000) else _free_port()
        ai_url = f"http://127.0.0.1:{ai_port}"
        specs.append(
            ProcessSpec(
                name="analysis",
                argv=[_script(bin_dir, "pulsecal-analysis")],
                ready_url=f"{ai_url}/health",
                env={"PORT": str(ai_port)},
                announce=(f"analysis  {ai_url}  (POST /analyze: the reference AI service)",),
            )
        )
    worker_port = settings.worker_port
    if not _port_is_free(worker_port):
        worker_port = _free_port()
    sidecar_port = _free_port()
    worker_pod = f"{settings.pod}-worker"
    specs += [
        ProcessSpec(
            name="worker",
            argv=[_script(bin_dir, "pulsecal-worker")],
            ready_url=f"http://127.0.0.1:{worker_port}/health/startup",
            env={
                "WORKER_PORT": str(worker_port),
                "POD_NAME": worker_pod,
                "AI_SERVICE_URL": ai_url,
            },
            announce=(
                f"worker    http://127.0.0.1:{worker_port}/health  (readings -> Postgres,"
                " alerts, analyses)",
            ),
        ),
        ProcessSpec(
            name="worker-sidecar",
            argv=[_script(bin_dir, "pulsecal-sidecar")],
            ready_url=f"http://127.0.0.1:{sidecar_port}/health/liveness",
            env={
                "SIDECAR_PORT": str(sidecar_port),
                "POD_NAME": worker_pod,
                "AI_SERVICE_URL": ai_url,
            },
            announce=(
                f"worker's  http://127.0.0.1:{sidecar_port}/  (its sidecar: dashboard, /metrics)",
            ),
            scrape=ScrapeTarget(
                address=f"127.0.0.1:{sidecar_port}", job="pulsecal-worker", pod=worker_pod
            ),
        ),
    ]
    return specs


@dataclass(slots=True)
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path | None


@dataclass(slots=True)
class _Watch:
    """Something that must stay up; ``died`` returns how it ended, if it ever does."""

    name: str
    died: Callable[[], Coroutine[Any, Any, str]]
    log: Path | None


@dataclass(slots=True)
class _Stack:
    run_dir: Path
    exits: contextlib.AsyncExitStack
    hurry: asyncio.Event
    out: TextIO
    watches: list[_Watch] = field(default_factory=list)
    children: dict[str, _Child] = field(default_factory=dict)

    def say(self, message: str) -> None:
        # On a terminal the simulator keeps rewriting its progress line: clear it first.
        prefix = "\r\x1b[K" if self.out.isatty() else ""
        print(f"{prefix}devstack: {message}", file=self.out, flush=True)

    async def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        log: Path | None,
        stop_timeout: float,
    ) -> _Child:
        """Start a long-running process; it is stopped (SIGTERM, then SIGKILL) on the way out.

        Each child gets its own session, so a Ctrl-C on the terminal reaches only this
        process, which then stops the children one by one in the right order.
        """
        with contextlib.ExitStack() as files:
            output = None if log is None else files.enter_context(log.open("ab"))
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=None if output is None else subprocess.STDOUT,
                start_new_session=True,
            )
        child = _Child(name, process, log)
        self.children[name] = child
        self.exits.push_async_callback(self._stop_child, child, stop_timeout)

        async def died() -> str:
            return f"exited with code {await process.wait()}"

        self.watches.append(_Watch(name, died, log))
        return child

    def forget(self, child: _Child) -> None:
        self.watches = [w for w in self.watches if w.name != child.name]

    async def _wait(self, awaitable: Awaitable[object], *, seconds: float) -> bool:
        """Await up to ``seconds``, less if a second Ctrl-C asks to hurry; True if it finished."""
        work = asyncio.ensure_future(awaitable)
        hurry = asyncio.ensure_future(self.hurry.wait())
        try:
            await asyncio.wait({work, hurry}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
            if not work.done():
                work.cancel()
        return work.done() and not work.cancelled()

    async def _stop_child(self, child: _Child, grace: float) -> None:
        process = child.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            if not await self._wait(process.wait(), seconds=grace):
                why = "asked to hurry" if self.hurry.is_set() else f"still up after {grace:g}s"
                self.say(f"killing {child.name} ({why})")
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            self.say(f"stopped {child.name} (exit {process.returncode})")


def _tail(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        lines = path.read_text(errors="replace").splitlines()[-_TAIL_LINES:]
    except OSError:
        return ""
    shown = "\n".join(f"    | {line}" for line in lines) or "    | (no output)"
    return f"\n  last output ({path}):\n{shown}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    # The service binds 0.0.0.0 with SO_REUSEADDR: the same bind tells whether it can.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


async def _redis_answers(url: str) -> str | None:
    """None if Redis answers PING at ``url``, else why not."""
    client = redis.asyncio.Redis.from_url(
        url, socket_connect_timeout=_PROBE_TIMEOUT, socket_timeout=_PROBE_TIMEOUT
    )
    try:
        await asyncio.wait_for(client.ping(), _PROBE_TIMEOUT * 2)
    except (redis.exceptions.RedisError, OSError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        await client.aclose()
    return None


async def _postgres_answers(url: str) -> str | None:
    """None if Postgres accepts a connection at ``url``, else why not."""
    try:
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(url, connect_timeout=int(_PROBE_TIMEOUT)),
            _PROBE_TIMEOUT * 2,
        )
    except (psycopg.Error, OSError, TimeoutError) as e:
        return f"{type(e).__name__}: {str(e).strip()}"
    await conn.close()
    return None


async def _start_redis(stack: _Stack, env: dict[str, str]) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError(
            "REDIS_URL does not answer and redis-server is not on PATH: install Redis"
            " (Debian: apt-get install redis-server) or point REDIS_URL at a running server"
        )
    data_dir = stack.run_dir / "redis"
    data_dir.mkdir()
    log = stack.run_dir / "redis.log"
    # A free port can be taken between finding it and binding it: try a few.
    for _ in range(3):
        port = _free_port()
        child = await stack.spawn(
            "redis",
            [
                *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            env=env,
            log=log,
            stop_timeout=5.0,
        )
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            if child.process.returncode is not None or await _redis_answers(url) is None:
                break
            await asyncio.sleep(0.1)
        if child.process.returncode is None and await _redis_answers(url) is None:
            return url
        stack.forget(child)
        if child.process.returncode is None:
            child.process.kill()
            await child.process.wait()
    raise StackError(f"the throwaway redis-server did not start{_tail(log)}")


def _find_postgres_binary(name: str) -> Path | None:
    found = shutil.which(name)
    if found is not None:
        return Path(found).resolve()

    def version(directory: str) -> tuple[int, ...]:
        digits = "".join(c if c.isdigit() else " " for c in directory).split()
        return tuple(int(d) for d in digits)

    for pattern in _POSTGRES_BIN_GLOBS:
        for directory in sorted(glob.glob(pattern), key=version, reverse=True):
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    return None


@dataclass(frozen=True, slots=True)
class _PostgresCluster:
    pg_ctl: Path
    data: Path
    as_user: list[str]
    log: Path

    def command(self, *args: str) -> list[str]:
        return [*self.as_user, str(self.pg_ctl), "-D", str(self.data), *args]


async def _run_quietly(
    argv: Sequence[str], *, env: dict[str, str], cwd: Path | None = None
) -> tuple[int, str]:
    """Run a short command to completion; (exit code, its output)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = await process.communicate()
    except BaseException:
        # Interrupted: stop its whole group (runuser's child too, which would otherwise go on
        # writing into a directory about to be removed) and wait until it is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def _start_postgres(stack: _Stack, env: dict[str, str]) -> str:
    initdb = _find_postgres_binary("initdb")
    if initdb is None:
        raise StackError(
            "DATABASE_URL does not answer and initdb is neither on PATH nor in"
            f" {', '.join(_POSTGRES_BIN_GLOBS)}: install PostgreSQL (Debian: apt-get install"
            " postgresql) or point DATABASE_URL at a running server"
        )
    # pg_ctl from the same installation, so that it starts the matching server.
    pg_ctl = initdb.parent / "pg_ctl"
    if not pg_ctl.is_file():
        raise StackError(f"found {initdb} but no pg_ctl beside it")
    pg_dir = stack.run_dir / "postgres"
    pg_dir.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        # Postgres refuses to run as root (a compromised server would own the machine), so
        # initdb and pg_ctl run as the `postgres` user, which must own the cluster's
        # directory and be able to reach it through the temporary directory.
        runuser = shutil.which("runuser")
        try:
            postgres_user = pwd.getpwnam("postgres")
        except KeyError:
            postgres_user = None
        if runuser is None or postgres_user is None:
            raise StackError(
                "running as root, Postgres must run as another user: need `runuser` and a"
                " `postgres` user (Debian's postgresql package creates it), or run devstack"
                " as a normal user, or point DATABASE_URL at a running server"
            )
        os.chown(pg_dir, postgres_user.pw_uid, postgres_user.pw_gid)
        stack.run_dir.chmod(0o711)
        as_user = [runuser, "-u", "postgres", "--"]
    data = pg_dir / "data"
    code, output = await _run_quietly(
        [
            *(*as_user, str(initdb), "-D", str(data), "-U", "postgres", "-A", "trust"),
            *("-E", "UTF8", "--locale=C", "--no-sync"),
        ],
        env=env,
        cwd=pg_dir,
    )
    if code != 0:
        raise StackError(f"initdb failed (exit {code}):\n{output}")
    cluster = _PostgresCluster(pg_ctl, data, as_user, pg_dir / "server.log")
    # Registered before the start: an interrupted `pg_ctl start` may still leave a server
    # running, detached from us.
    stack.exits.push_async_callback(_stop_postgres, stack, cluster, env)
    for _ in range(3):
        port = _free_port()
        # Durability is pointless for throwaway data; without it the stack starts faster.
        server_options = (
            f"-p {port} -k {pg_dir} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        code, output = await _run_quietly(
            cluster.command(
                "-l", str(cluster.log), "-w", "-t", "30", "-o", server_options, "start"
            ),
            env=env,
            cwd=pg_dir,
        )
        if code == 0:
            break
    else:
        raise StackError(f"the throwaway Postgres did not start:\n{output}{_tail(cluster.log)}")
    pid = int((data / "postmaster.pid").read_text().split()[0])

    async def died() -> str:
        while True:
            await asyncio.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"(postmaster pid {pid}) is gone"
            except PermissionError:
                pass  # alive, owned by another user

    stack.watches.append(_Watch("postgres", died, cluster.log))
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


async def _stop_postgres(stack: _Stack, cluster: _PostgresCluster, env: dict[str, str]) -> None:
    if not (cluster.data / "postmaster.pid").exists():
        return  # never started, or already gone
    mode = "immediate" if stack.hurry.is_set() else "fast"
    code, output = await _run_quietly(
        cluster.command("-m", mode, "-w", "-t", "20", "stop"), env=env, cwd=cluster.data.parent
    )
    if code != 0 and mode == "fast":
        code, output = await _run_quietly(
            cluster.command("-m", "immediate", "-w", "stop"), env=env, cwd=cluster.data.parent
        )
    if code == 0:
        stack.say("stopped postgres")
    else:
        stack.say(f"pg_ctl stop failed (exit {code}): {output.strip()}")


def prometheus_config(
    targets: Sequence[ScrapeTarget],
    *,
    rule_files: Sequence[Path],
    token_file: Path | None,
    interval: str = _PROMETHEUS_INTERVAL,
) -> dict[str, Any]:
    """The local Prometheus's configuration: every sidecar of the stack, the project's rules.

    One job per ``job`` label, each target labelled ``namespace`` and ``pod`` as
    ops/prometheus.yml labels them in Kubernetes, so the rules read the same here.
    """
    jobs: dict[str, list[dict[str, Any]]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(
            {
                "targets": [target.address],
                "labels": {"namespace": _PROMETHEUS_NAMESPACE, "pod": target.pod},
            }
        )
    scrape_configs: list[dict[str, Any]] = []
    for job, static_configs in jobs.items():
        scrape: dict[str, Any] = {
            "job_name": job,
            "metrics_path": "/metrics",
            "static_configs": static_configs,
        }
        if token_file is not None:
            scrape["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
        scrape_configs.append(scrape)
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": scrape_configs,
    }


_NO_PROMETHEUS = (
    "prometheus is not on PATH: running without it. To have one scrape the sidecars and"
    " evaluate ops/alerts.yml, install it (Debian: apt-get install prometheus) and run again"
)


async def _start_prometheus(
    stack: _Stack, targets: Sequence[ScrapeTarget], env: dict[str, str], *, within: float
) -> str | None:
    """A Prometheus scraping ``targets``, its data in the run directory; its URL.

    None, after saying how to get one, when ``prometheus`` is not on PATH. Port 9090 when it
    is free, else a free one. Started after the sidecars, it is stopped before them.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        stack.say(_NO_PROMETHEUS)
        return None
    directory = stack.run_dir / "prometheus"
    directory.mkdir()
    token_file: Path | None = None
    token = env.get("METRICS_TOKEN")
    if token:
        # A credential: readable by this user only, like devices.json.
        token_file = directory / "metrics-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
    rule_files = [ALERT_RULES] if ALERT_RULES.is_file() else []
    if not rule_files:
        stack.say(f"{ALERT_RULES} not found: Prometheus runs without the alert rules")
    config = directory / "prometheus.yml"
    # JSON is YAML: no YAML library needed.
    config.write_text(
        json.dumps(
            prometheus_config(targets, rule_files=rule_files, token_file=token_file), indent=2
        )
    )
    log = stack.run_dir / "prometheus.log"
    # A free port can be taken between finding it and binding it: try a few.
    for attempt in range(3):
        port = (
            _PROMETHEUS_PORT if attempt == 0 and _port_is_free(_PROMETHEUS_PORT) else _free_port()
        )
        child = await stack.spawn(
            "prometheus",
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--enable-feature=exemplar-storage",
            ],
            env=env,
            log=log,
            stop_timeout=10.0,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await _wait_ready(child, f"{url}/-/ready", within=within)
        except StackError:
            if child.process.returncode is None or "address already in use" not in _tail(log):
                raise
            stack.forget(child)
            continue
        return url
    raise StackError(f"prometheus did not start{_tail(log)}")


def _script(bin_dir: Path, name: str) -> str:
    # The console scripts of the venv this Python belongs to, not whatever is on PATH.
    path = bin_dir / name
    if path.is_file():
        return str(path)
    raise StackError(
        f"{name} not found in {bin_dir}: install the project into this environment"
        f" ({sys.executable} -m pip install -e .)"
    )


async def _admin(bin_dir: Path, env: dict[str, str], *args: str) -> str:
    argv = [_script(bin_dir, "pulsecal-admin"), *args]
    code, output = await _run_quietly(argv, env=env)
    if code != 0:
        raise StackError(f"pulsecal-admin {' '.join(args)} failed (exit {code}):\n{output}")
    return output


async def _register_devices(
    bin_dir: Path, env: dict[str, str], count: int, path: Path
) -> list[str]:
    device_ids = [f"sim-{i:03d}" for i in range(1, count + 1)]
    # A handful at a time: each one is a Python start-up plus a connection.
    limit = asyncio.Semaphore(4)

    async def register(device_id: str) -> str:
        async with limit:
            # --rotate: a device left from an earlier run gets a fresh token instead of an error.
            output = await _admin(bin_dir, env, "device", "add", device_id, "--rotate")
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        if not lines:
            raise StackError(f"pulsecal-admin device add {device_id} printed no token")
        return lines[-1]

    tokens = await asyncio.gather(*(register(d) for d in device_ids))
    # The tokens are credentials: readable by this user only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(zip(device_ids, tokens, strict=True)), f, indent=2)
    return device_ids


async def _wait_ready(child: _Child, url: str, *, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
        while True:
            if child.process.returncode is not None:
                raise StackError(
                    f"{child.name} exited with code {child.process.returncode} before it was"
                    f" ready{_tail(child.log)}"
                )
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
                    last = f"{response.status} {(await response.text())[:300]}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
            if loop.time() > deadline:
                raise StackError(
                    f"{child.name} not ready after {within:g}s; {url} answered: {last}"
                    f"{_tail(child.log)}"
                )
            await asyncio.sleep(0.2)


async def _supervise(stack: _Stack, duration: float) -> str | None:
    """Wait for ``duration`` (0: for ever); None when it passed, else what died and how."""
    tasks = {asyncio.create_task(watch.died()): watch for watch in stack.watches}
    try:
        done, _ = await asyncio.wait(
            tasks, timeout=duration or None, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not done:
        return None
    task = done.pop()
    watch = tasks[task]
    return f"{watch.name} {task.result()} unexpectedly{_tail(watch.log)}"


async def _up(stack: _Stack, settings: DevStackSettings, options: _Options) -> int:
    """Start everything, then wait; the exit stack stops it all when this returns."""
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bin_dir = Path(sys.executable).parent

    redis_url = settings.redis_url
    redis_note = "REDIS_URL" if "REDIS_URL" in os.environ else "the default REDIS_URL"
    why = await _redis_answers(redis_url)
    if why is not None:
        stack.say(f"Redis at {redis_url} does not answer ({why}); starting a throwaway one")
        redis_url, redis_note = await _start_redis(stack, base_env), "throwaway"
    database_url = settings.database_url
    database_note = "DATABASE_URL" if "DATABASE_URL" in os.environ else "the default DATABASE_URL"
    why = await _postgres_answers(database_url)
    if why is not None:
        stack.say(f"Postgres at {database_url} does not answer ({why}); starting a throwaway one")
        database_url, database_note = await _start_postgres(stack, base_env), "throwaway"

    port = settings.port if options.port is None else options.port
    if port == 0:
        port = _free_port()
    elif not _port_is_free(port):
        busy, port = port, _free_port()
        stack.say(f"port {busy} is busy; the service will listen on {port}")
    env = {**base_env, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "PORT": str(port)}
    # A local stack is a development one: the dashboard and /health show their details without
    # an operator token (docs/health.md) unless the caller says otherwise.
    env.setdefault("ENVIRONMENT", "development")

    await _admin(bin_dir, env, "db", "upgrade")
    devices_file = stack.run_dir / "devices.json"
    device_ids = await _register_devices(bin_dir, env, options.devices, devices_file)

    announcements: list[str] = []
    targets: list[ScrapeTarget] = []
    for spec in _extra_processes(bin_dir=bin_dir, settings=settings):
        announcements.extend(spec.announce)
        if spec.scrape is not None:
            targets.append(spec.scrape)
        child = await stack.spawn(
            spec.name,
            spec.argv,
            env={**env, **spec.env},
            log=stack.run_dir / f"{spec.name}.log",
            stop_timeout=spec.stop_timeout,
        )
        if spec.ready_url is not None:
            await _wait_ready(child, spec.ready_url, within=options.startup_timeout)

    if options.prometheus and not settings.metrics_enabled:
        stack.say("METRICS_ENABLED=false: no Prometheus (the sidecars export no metrics)")
    elif options.prometheus:
        prometheus_url = await _start_prometheus(
            stack, targets, env, within=options.startup_timeout
        )
        if prometheus_url is not None:
            rules = f"the rules of {ALERT_RULES.name}" if ALERT_RULES.is_file() else "no rules"
            announcements += [
                f"prometheus {prometheus_url}/  (scrapes the {len(targets)} sidecars every"
                f" {_PROMETHEUS_INTERVAL}; {rules}: {prometheus_url}/alerts)",
            ]

    service_url = f"http://127.0.0.1:{port}"
    service = await stack.spawn(
        "service",
        [_script(bin_dir, "pulsecal-service")],
        env=env,
        log=stack.run_dir / "service.log",
        # The service drains for up to SHUTDOWN_TIMEOUT; give it that and a little more.
        stop_timeout=settings.shutdown_timeout + 5.0,
    )
    await _wait_ready(service, f"{service_url}/health/startup", within=options.startup_timeout)

    stream = Keys(prefix=settings.redis_key_prefix).readings
    stack.say(
        "up\n"
        f"  service   {service_url}  (POST /ingestion/ppg, GET /ingestion/ws, /health)\n"
        + "".join(f"  {line}\n" for line in announcements)
        + f"  redis     {redis_url}  ({redis_note}); readings go to the stream {stream}\n"
        f"  postgres  {database_url}  ({database_note})\n"
        f"  devices   {device_ids[0]}..{device_ids[-1]}, tokens in {devices_file}\n"
        f"  logs      {stack.run_dir}/*.log"
        + ("" if options.keep else " (removed on exit; --keep keeps them)")
        + f"\n  try       redis-cli -u {redis_url} XLEN '{stream}'\n"
        + (
            "  Ctrl-C stops everything"
            if options.duration <= 0
            else f"  stops by itself after {options.duration:g}s"
        )
    )
    if options.run_sim:
        await stack.spawn(
            "simulator",
            [
                *(_script(bin_dir, "pulsecal-sim"), "--url", service_url),
                *("--devices-file", str(devices_file)),
                *("--ws-fraction", str(options.ws_fraction), "--rate-hz", str(options.rate_hz)),
            ],
            env=env,
            log=None,  # its progress line is what the developer watches
            stop_timeout=10.0,
        )

    died = await _supervise(stack, options.duration)
    if died is not None:
        stack.say(died)
        return 1
    return 0


def _remove(stack: _Stack, *, keep: bool) -> None:
    if keep:
        stack.say(f"kept {stack.run_dir}")
        return
    shutil.rmtree(stack.run_dir, ignore_errors=True)
    if stack.run_dir.exists():
        stack.say(f"could not remove all of {stack.run_dir}")


async def _run(options: _Options, settings: DevStackSettings) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    hurry = asyncio.Event()
    state = {"interrupted": False, "stopping": False}
    run_dir = Path(tempfile.mkdtemp(prefix="pulsecal-devstack-"))
    code = 1
    async with contextlib.AsyncExitStack() as exits:
        stack = _Stack(run_dir=run_dir, exits=exits, hurry=hurry, out=sys.stdout)

        def on_signal(name: str) -> None:
            if state["interrupted"] or state["stopping"]:
                stack.say(f"{name} again: not waiting any longer")
                hurry.set()
                return
            state["interrupted"] = True
            stack.say(f"{name}: stopping")
            main_task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum.name)
        exits.callback(_remove, stack, keep=options.keep)
        try:
            code = await _up(stack, settings, options)
        except asyncio.CancelledError:
            if not state["interrupted"]:
                raise
            main_task.uncancel()
            code = 0
        except StackError as e:
            stack.say(f"error: {e}")
            code = 1
        state["stopping"] = True
        if code == 0 and not state["interrupted"]:
            stack.say(f"{options.duration:g}s passed: stopping")
        # Leaving this block stops everything, newest first: simulator, service, Prometheus,
        # extra processes, Postgres, Redis; then the temporary directory goes.
    simulator = stack.children.get("simulator")
    if (
        code == 0
        and not state["interrupted"]
        and simulator is not None
        and simulator.process.returncode != 0
    ):
        stack.say(
            f"the simulator exited with code {simulator.process.returncode}"
            " (1: no batch was acknowledged)"
        )
        code = 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)
    return code


def _parser(settings: DevStackSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.devstack",
        description="Run Redis, Postgres, pulsecal-service and the device simulator locally.",
    )
    parser.add_argument(
        "--devices", type=int, default=8, help="demo devices to register and simulate (8)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"service port (default $PORT or {settings.port}; 0 = any free port;"
        " a busy port is replaced by a free one)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop by itself after this many seconds (default: run until Ctrl-C)",
    )
    parser.add_argument("--ws-fraction", type=float, default=0.5, help="passed to pulsecal-sim")
    parser.add_argument("--rate-hz", type=float, default=50.0, help="passed to pulsecal-sim")
    parser.add_argument(
        "--no-sim", dest="run_sim", action="store_false", help="do not start the simulator"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, data, tokens)"
    )
    parser.add_argument(
        "--no-prometheus",
        dest="prometheus",
        action="store_false",
        help="do not start Prometheus (started by default when `prometheus` is on PATH)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=30.0,
        help="seconds the service has to become ready (30)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings_or_exit(os.environ, DevStackSettings)
    parser = _parser(settings)
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices: at least 1")
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error("--port: expected 0..65535")
    if args.duration < 0:
        parser.error("--duration: expected >= 0")
    if not 0 <= args.ws_fraction <= 1:
        parser.error("--ws-fraction: expected a number in [0, 1]")
    if not 0 < args.rate_hz <= 10_000:
        parser.error("--rate-hz: expected a number in (0, 10000]")
    options = _Options(
        devices=args.devices,
        port=args.port,
        duration=args.duration,
        ws_fraction=args.ws_fraction,
        rate_hz=args.rate_hz,
        run_sim=args.run_sim,
        keep=args.keep,
        startup_timeout=args.startup_timeout,
        prometheus=args.prometheus,
    )
    raise SystemExit(asyncio.run(_run(options, settings)))


if __name__ == "__main__":
    main()
