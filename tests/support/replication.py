"""A Redis primary and its replicas as real processes, and the links between them.

``RedisNode`` is a redis-server of the test's own on a free port, started as a replica of
another (or of a ``Forwarder`` in front of it) when asked; ``kill`` is ``kill -9``.
``Forwarder`` forwards TCP to one node. As the address the service is given (what a
Kubernetes Service in front of the current primary is), ``point_at`` moves it to another
node, dropping every connection it carried, as a failover does. As a replica's link to its
primary, ``cut`` stops it carrying anything (a partition: the replica falls behind while
both sides still see the connection up), and ``drop`` then loses what it held back.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.support.procs import free_port

__all__ = ("Forwarder", "RedisNode")

READY_DEADLINE = 15.0


class RedisNode:
    def __init__(
        self, directory: Path, *, replica_of: "RedisNode | Forwarder | None" = None
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = directory / "redis.log"
        self._argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self._log),
            # A replica's full sync starts at once (the default waits 5 s for others).
            "--repl-diskless-sync-delay",
            "0",
        ]
        self._replica_of = replica_of
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = list(self._argv)
        if self._replica_of is not None:  # a forwarder's port is known once it listens
            argv += ["--replicaof", "127.0.0.1", str(self._replica_of.port)]
        self._process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)

    async def wait_ready(self) -> None:
        async with asyncio.timeout(READY_DEADLINE):
            while True:
                client = self.client()
                try:
                    if await client.ping():
                        return
                except (RedisError, OSError):
                    pass
                finally:
                    await client.aclose()
                await asyncio.sleep(0.05)

    async def wait_in_sync(self) -> None:
        """Until this replica's link to its primary is up and the initial sync done."""
        async with asyncio.timeout(READY_DEADLINE):
            while True:
                client = self.client()
                try:
                    info = await client.info("replication")
                finally:
                    await client.aclose()
                if info.get("master_link_status") == "up" and not info.get(
                    "master_sync_in_progress"
                ):
                    return
                await asyncio.sleep(0.05)

    async def promote(self) -> None:
        """``REPLICAOF NO ONE``: this replica becomes a primary with what it has."""
        client = self.client()
        try:
            await client.execute_command("REPLICAOF", "NO", "ONE")
        finally:
            await client.aclose()

    def _signal(self, signum: signal.Signals) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signum)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        if self._process is not None:
            self._process.wait()

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""


class Forwarder:
    """A TCP forwarder to one node."""

    def __init__(self, node: RedisNode) -> None:
        self._port = node.port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pairs: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def point_at(self, node: RedisNode) -> None:
        """New connections go to ``node``; the ones open now are dropped."""
        self._port = node.port
        self.drop()

    def cut(self) -> None:
        """Nothing goes through any more (it waits here) until ``drop`` or ``mend``."""
        self._flowing.clear()

    def mend(self) -> None:
        self._flowing.set()

    def drop(self) -> None:
        """Every connection open now is dropped with what it held back."""
        for writer in list(self._pairs):
            writer.transport.abort()
        self._pairs.clear()
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        except OSError:
            writer.transport.abort()
            return
        self._pairs.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                if not self._flowing.is_set():
                    await self._flowing.wait()
                    if sink.transport.is_closing():
                        return
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
