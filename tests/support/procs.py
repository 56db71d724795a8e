"""Real processes for the fault and shutdown tests: redis-server, pulsecal-service, a proxy.

Every process starts in a session of its own, so ``kill`` ends its whole process group; it
may be called twice, so fixtures call it in their finalizers whatever the test did before.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.support.settings import SETTINGS_VARIABLES

__all__ = ("RedisProxy", "RedisServer", "ServiceProcess", "free_port")

SERVICE_BIN = Path(sys.executable).with_name("pulsecal-service")
READY_DEADLINE = 15.0  # seconds for a process to start answering

_ERRORS = ("error", "critical")
# The service must see only the configuration a test gives it, not the developer's shell.
_SETTINGS_ENV = SETTINGS_VARIABLES


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Process:
    """A child process in its own process group, its output in files."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], log_dir: Path) -> None:
        self._argv = list(argv)
        self._env = dict(env)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = Path(argv[0]).name
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self._popen = subprocess.Popen(
                self._argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def _process(self) -> "subprocess.Popen[bytes]":
        assert self._popen is not None, "not started"
        return self._popen

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    def send_signal(self, signum: signal.Signals) -> None:
        self._process.send_signal(signum)

    async def exited(self) -> int:
        """Wait for the exit (bound it with ``asyncio.timeout``); the exit code."""
        while (code := self._process.poll()) is None:
            await asyncio.sleep(0.02)
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group (SIGKILL also ends a stopped process) and reap it."""
        if self._popen is None:
            return
        # Only while the leader is unreaped: its pid (the group id) cannot have been reused.
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)
        self._popen.wait(timeout=10)

    def output(self) -> str:
        return "".join(
            path.read_text(errors="replace")
            for path in (self.stdout_path, self.stderr_path)
            if path.exists()
        )

    async def wait_answering(self, url: str) -> None:
        """Until ``url`` answers 200; fails at once if the process exits meanwhile."""
        async with (
            ClientSession(timeout=ClientTimeout(total=1)) as session,
            asyncio.timeout(READY_DEADLINE),
        ):
            while True:
                if self.returncode is not None:
                    name = Path(self._argv[0]).name
                    raise RuntimeError(f"{name} exited ({self.returncode}):\n{self.output()}")
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except (ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)


class RedisServer(_Process):
    """A redis-server of the test's own whose every acknowledged write survives ``kill -9``."""

    def __init__(self, directory: Path, *, port: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            env=os.environ,
            log_dir=directory,
        )
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"

    async def wait_ready(self) -> None:
        """Until it answers PING, which it does only once the AOF is loaded."""
        async with asyncio.timeout(READY_DEADLINE):
            while not await self._answers_ping():
                if self.returncode is not None:
                    raise RuntimeError(f"redis-server exited ({self.returncode}):\n{self.output()}")
                await asyncio.sleep(0.05)

    async def _answers_ping(self) -> bool:
        client = Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()

    def pause(self) -> None:
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)


class ServiceProcess(_Process):
    """``pulsecal-service`` on a free port, configured only by the given variables."""

    def __init__(self, config: Mapping[str, str], *, log_dir: Path) -> None:
        self.port = free_port()
        env = {name: value for name, value in os.environ.items() if name not in _SETTINGS_ENV}
        env.update({"LOG_DIR": str(log_dir), **config, "PORT": str(self.port)})
        super().__init__([str(SERVICE_BIN)], env=env, log_dir=log_dir)
        self.url = f"http://127.0.0.1:{self.port}"

    def logged_errors(self) -> list[str]:
        """Output lines reporting an error: a traceback, or a log record of level error or up."""
        return [
            line
            for line in self.output().splitlines()
            if "Traceback" in line or any(f'"level":"{level}"' in line for level in _ERRORS)
        ]

    async def wait_started(self) -> None:
        """Until ``/health/startup`` answers 200."""
        await self.wait_answering(f"{self.url}/health/startup")


class RedisProxy:
    """A TCP proxy in front of Redis that can hold back the replies to script calls.

    A connection that has sent ``EVALSHA`` is the service's data connection (the writer is
    the only user of scripts); while the proxy holds, Redis runs what that connection sends
    but its replies wait in the proxy. Telemetry, heartbeats and health checks flow freely.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        scripted = asyncio.Event()
        for pump in (
            self._to_redis(reader, up_writer, scripted),
            self._to_client(up_reader, writer, scripted),
        ):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _to_redis(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, scripted: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if b"EVALSHA" in data:
                    scripted.set()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, scripted: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if scripted.is_set():
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()
