"""A minimal Redis connection for the ingest write path.

redis-py spends more CPU per command than the rest of a request (connection pool checkout,
per-argument encoding, stream reader, timeouts; BENCHMARKS.md); the service sends one
command per group commit and that cost lands on the hot path. This connection writes pre-
encoded RESP on a raw asyncio transport and parses replies with hiredis (the parser redis-py
itself uses), so a command costs a join, one ``write`` and one parse. Everything else that
talks to Redis (telemetry, heartbeats, health checks) keeps using redis-py.
"""

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

__all__ = ("RespConnection", "encode_bulk_strings", "encode_command")


def encode_bulk_strings(args: Sequence[bytes]) -> bytes:
    """``args`` as the bulk strings of a RESP array, without the array's header."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


def encode_command(args: Sequence[bytes]) -> bytes:
    return b"*%d\r\n%s" % (len(args), encode_bulk_strings(args))


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # In the order the replies will come; None for a reply nobody needs (``send``'s
        # ``skip``).
        self._waiters: collections.deque[asyncio.Future[Any] | None] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiters:
                continue  # a reply nobody waits for any more (its caller timed out)
            waiter = self._waiters.popleft()
            if waiter is None or waiter.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(ResponseError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        lost = exc or RedisConnectionError("connection closed by server")
        self.lost = self.lost or lost
        self.fail(RedisConnectionError(f"connection lost: {lost}"))

    def fail(self, error: Exception) -> None:
        """The connection is unusable: every command waiting on it fails with a copy of
        ``error``."""
        self.lost = self.lost or error
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter is not None and not waiter.done():
                waiter.set_exception(type(error)(*error.args))

    def send(self, command: bytes, skip: int = 0) -> asyncio.Future[Any]:
        """Write ``command`` (one or more commands); the future holds the reply that comes
        after ``skip`` others, which are dropped."""
        assert self.transport is not None
        waiter: asyncio.Future[Any] = self._loop.create_future()
        if skip:
            self._waiters.extend([None] * skip)
        self._waiters.append(waiter)
        self.transport.write(command)
        return waiter


class RespConnection:
    """One lazily (re)connected connection; a failed command drops it, the next reconnects.

    After a timeout the connection is dropped as well: a late reply must never be taken for
    the answer to a later command.
    """

    def __init__(self, url: str, *, connect_timeout: float, setup: Sequence[bytes] = ()) -> None:
        parts = urlsplit(url)
        self._unix_path = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._tls = parts.scheme == "rediss"
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = parts.path.lstrip("/") if parts.scheme != "unix" else ""
        self._db = int(db) if db.isdigit() else 0
        self._connect_timeout = connect_timeout
        # Sent on every new connection before anything else (a script to load, say).
        self._setup = tuple(setup)
        self._protocol: _Protocol | None = None
        # Counts the connections made: a command that must go on the connection an earlier
        # one went on (WAIT after a write) names it (``execute``'s ``generation``).
        self.generation = 0
        # Pipelined callers must share one connection, so they share one attempt to open it:
        # if it fails, it fails them all at once (not one connect timeout after another).
        self._attempt: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._unix_path is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._unix_path)
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol,
                        self._host,
                        self._port,
                        ssl=ssl.create_default_context() if self._tls else None,
                    )
                if self._password is not None:
                    auth = [b"AUTH", self._password.encode()]
                    if self._username is not None:
                        auth.insert(1, self._username.encode())
                    await protocol.send(encode_command(auth))
                if self._db:
                    await protocol.send(encode_command([b"SELECT", b"%d" % self._db]))
                for command in self._setup:
                    await protocol.send(command)
        except BaseException:
            # A connection that could not be set up is not left open.
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
            raise
        return protocol

    def _attempted(self, attempt: "asyncio.Future[_Protocol]") -> None:
        # Runs before the callers waiting on the attempt resume.
        self._attempt = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._protocol = attempt.result()
            self.generation += 1

    async def _connected(self) -> _Protocol:
        attempt = self._attempt
        if attempt is None:
            attempt = self._attempt = asyncio.ensure_future(self._connect())
            attempt.add_done_callback(self._attempted)
        try:
            # Shielded: one caller cancelled must not cancel the others' attempt.
            return await asyncio.shield(attempt)
        except TimeoutError:
            raise RedisConnectionError("timed out connecting to Redis") from None
        except OSError as e:
            raise RedisConnectionError(f"cannot connect to Redis: {e}") from e

    async def execute(self, command: bytes, *, skip: int = 0, generation: int | None = None) -> Any:
        """Send encoded commands and return the reply after the first ``skip``; Redis errors
        raise ResponseError. With ``generation``, only on that connection: if it is gone, a
        ConnectionError instead of a new one."""
        protocol = self._protocol
        if generation is not None and (
            generation != self.generation or protocol is None or protocol.lost is not None
        ):
            raise RedisConnectionError("the connection the command belongs to is gone")
        if protocol is None or protocol.lost is not None:
            protocol = await self._connected()
        try:
            return await protocol.send(command, skip)
        except BaseException as e:
            if not isinstance(e, ResponseError):
                self.close()
            raise

    def abort(self, error: Exception) -> None:
        """Drop the connection at once (nothing flushed), failing every command waiting on
        it with ``error``; the next command reconnects."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(error)
            if protocol.transport is not None:
                protocol.transport.abort()

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
