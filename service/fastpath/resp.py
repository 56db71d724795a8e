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

from .cluster import Address, SlotMap, parse_redirect

__all__ = (
    "RedirectError",
    "RespConnection",
    "cluster_slots",
    "encode_bulk_strings",
    "encode_command",
)


def encode_bulk_strings(args: Sequence[bytes]) -> bytes:
    """``args`` as the bulk strings of a RESP array, without the array's header."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


def encode_command(args: Sequence[bytes]) -> bytes:
    return b"*%d\r\n%s" % (len(args), encode_bulk_strings(args))


class RedirectError(ResponseError):
    """A command answered ``MOVED`` or ``ASK`` (``redirect``), or a transaction aborted as
    one of its commands was."""

    def __init__(self, message: str, redirect: str) -> None:
        super().__init__(message)
        self.redirect = redirect


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # In the order the replies will come; None for a reply nobody needs (``send``'s
        # ``skip``).
        self._waiters: collections.deque[asyncio.Future[Any] | None] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        # A MOVED or ASK among the replies to the command being answered (in a transaction,
        # the reply to a queued command, which ``send`` may skip; EXEC then answers
        # EXECABORT): its waiter fails with a ``RedirectError`` carrying it.
        self._redirect: str | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if (
                isinstance(reply, hiredis.ReplyError)
                and self._redirect is None
                and str(reply).startswith(("MOVED ", "ASK "))
            ):
                self._redirect = str(reply)
            if not self._waiters:
                continue  # a reply nobody waits for any more (its caller timed out)
            waiter = self._waiters.popleft()
            if waiter is None:
                continue  # skipped: a redirect it carried stays for the command's waiter
            redirect, self._redirect = self._redirect, None
            if waiter.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(
                    ResponseError(str(reply))
                    if redirect is None
                    else RedirectError(str(reply), redirect)
                )
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

    On a Redis Cluster (``slots``), the connection goes to the primary serving ``slot`` and
    follows it: a command answered ``MOVED`` (the slot moved, or a failover promoted a
    replica) is sent again, on a new connection to the node named, once the map is read
    again; a command answered ``ASK`` (the slot is being migrated and the keys are already
    there) is sent once to that node after ``ASKING``, on a connection of its own; a
    connection that fails makes the next one read the map first.
    """

    MAX_REDIRECTS = 3

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        setup: Sequence[bytes] = (),
        slots: SlotMap | None = None,
        slot: int = 0,
    ) -> None:
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
        self._slots = slots
        self._slot = slot
        # Writes sent to another node after ASK, and MOVED answers followed.
        self.asked = 0
        self.moved = 0

    @property
    def address(self) -> Address:
        """Where the connection goes (on a cluster: the last node it went to)."""
        return self._host, self._port

    async def _connect(self, address: Address | None = None, *, asking: bool = False) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if address is None and self._slots is not None:
                    address = await self._slots.primary(self._slot)
                    self._host, self._port = address
                if self._unix_path is not None and address is None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._unix_path)
                else:
                    host, port = address or (self._host, self._port)
                    _, protocol = await loop.create_connection(
                        _Protocol,
                        host,
                        port,
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
                if asking:
                    await protocol.send(_ASKING)
        except BaseException:
            # A connection that could not be set up is not left open.
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
            if self._slots is not None:
                self._slots.invalidate()
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
        ConnectionError instead of a new one.

        On a cluster a redirected command is sent again where it belongs (class docstring).
        After an ``ASK`` it went on another connection: ``generation`` then names none, so a
        command bound to the connection (WAIT) fails instead of asking the wrong node."""
        for _ in range(self.MAX_REDIRECTS):
            protocol = self._protocol
            if generation is not None and (
                generation != self.generation or protocol is None or protocol.lost is not None
            ):
                raise RedisConnectionError("the connection the command belongs to is gone")
            if protocol is None or protocol.lost is not None:
                protocol = await self._connected()
            try:
                return await protocol.send(command, skip)
            except RedirectError as e:
                redirect = parse_redirect(e.redirect)
                if redirect is None or self._slots is None or generation is not None:
                    raise
            except ResponseError:
                raise  # Redis answered: the connection is fine
            except BaseException:
                if self._slots is not None:
                    self._slots.invalidate()
                self.close()
                raise
            kind, slot, address = redirect
            if kind == "ASK":
                self.asked += 1
                self.generation += 1
                return await self._asking(address, command, skip)
            self.moved += 1
            self._slots.moved(slot, address)
            self.close()
        raise ResponseError(f"redirected more than {self.MAX_REDIRECTS} times")

    async def _asking(self, address: Address, command: bytes, skip: int) -> Any:
        """``command`` sent once to ``address`` after ``ASKING``, on a connection of its own."""
        try:
            protocol = await self._connect(address, asking=True)
        except TimeoutError:
            raise RedisConnectionError("timed out connecting to Redis") from None
        except OSError as e:
            raise RedisConnectionError(f"cannot connect to Redis: {e}") from e
        try:
            return await protocol.send(command, skip)
        finally:
            if protocol.transport is not None:
                protocol.transport.close()

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


_ASKING = encode_command([b"ASKING"])


async def cluster_slots(url: str, address: Address, *, connect_timeout: float) -> list[Any]:
    """``CLUSTER SLOTS`` of the node at ``address`` (``url`` gives the credentials)."""
    connection = RespConnection(url, connect_timeout=connect_timeout)
    connection._host, connection._port = address
    try:
        async with asyncio.timeout(connect_timeout):
            reply: list[Any] = await connection.execute(encode_command([b"CLUSTER", b"SLOTS"]))
        return reply
    finally:
        connection.close()
