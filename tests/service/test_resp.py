"""The write path's own Redis connection: database selection, errors, reconnection."""

import asyncio
import hashlib
import time
import uuid
from itertools import chain
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.fastpath.resp import RespConnection, encode_command
from service.ratelimit import ALLOWED, REFUSED, Policy, Window
from service.store import (
    DUPLICATE,
    NOT_ATTEMPTED,
    STORED,
    WRITE_CONNECTION_SETUP,
    ReadingsWriter,
    StoreUnavailableError,
)
from shared.keys import Keys
from shared.readings import encode_write
from shared.tasks import cancel_and_wait
from tests.support.env import REDIS_URL


def command(*args: str) -> bytes:
    return encode_command([a.encode() for a in args])


def readings_writer(
    connection: RespConnection,
    keys: Keys,
    *,
    max_in_flight: int = 1,
    timeout: float = 1,
    policy: Policy | None = None,
) -> ReadingsWriter:
    return ReadingsWriter(
        connection,
        keys,
        max_batch=10,
        max_pending=10,
        max_in_flight=max_in_flight,
        timeout=timeout,
        idempotency_window=128,
        idempotency_ttl=3600,
        policy=policy,
    )


async def test_commands_go_to_the_database_named_in_the_url() -> None:
    key = f"test:{uuid.uuid4().hex}"
    conn = RespConnection("redis://127.0.0.1:6379/3", connect_timeout=1)
    other = Redis.from_url("redis://127.0.0.1:6379/3")
    try:
        assert await conn.execute(command("SET", key, "v")) == b"OK"
        assert await other.get(key) == b"v"
    finally:
        await other.delete(key)
        await other.aclose()
        conn.close()


async def test_a_redis_error_raises_and_keeps_the_connection_usable() -> None:
    conn = RespConnection("redis://127.0.0.1:6379/0", connect_timeout=1)
    try:
        assert await conn.execute(command("PING")) == b"PONG"
        connected = conn.generation
        with pytest.raises(ResponseError, match="unknown command"):
            await conn.execute(command("NO-SUCH-COMMAND"))
        assert await conn.execute(command("PING")) == b"PONG"
        # The same connection: writes pipelined behind an error are not failed with it.
        assert conn.generation == connected
    finally:
        conn.close()


async def test_unreachable_server_raises_connection_error() -> None:
    conn = RespConnection("redis://127.0.0.1:1/0", connect_timeout=1)

    with pytest.raises(RedisConnectionError):
        await conn.execute(command("PING"))


async def test_a_dropped_connection_is_replaced_on_the_next_command() -> None:
    conn = RespConnection("redis://127.0.0.1:6379/0", connect_timeout=1)
    admin = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        first_id = await conn.execute(command("CLIENT", "ID"))
        await admin.execute_command("CLIENT", "KILL", "ID", first_id)
        await asyncio.sleep(0.1)  # let the close reach the client

        second_id = await conn.execute(command("CLIENT", "ID"))

        assert second_id != first_id
    finally:
        await admin.aclose()
        conn.close()


async def test_a_command_bound_to_a_connection_that_is_gone_never_goes_on_a_new_one() -> None:
    """A WAIT answers for the writes of the connection it goes on: on a new one it would
    confirm writes it never saw, so it must fail instead."""
    conn = RespConnection("redis://127.0.0.1:6379/0", connect_timeout=1)
    admin = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        first_id = await conn.execute(command("CLIENT", "ID"))
        bound = conn.generation
        assert await conn.execute(command("CLIENT", "ID"), generation=bound) == first_id
        await admin.execute_command("CLIENT", "KILL", "ID", first_id)
        await asyncio.sleep(0.1)  # let the close reach the client

        with pytest.raises(RedisConnectionError, match="is gone"):
            await conn.execute(command("WAIT", "0", "1"), generation=bound)
        assert await conn.execute(command("CLIENT", "ID")) != first_id  # unbound: reconnects
        with pytest.raises(RedisConnectionError, match="is gone"):
            await conn.execute(command("WAIT", "0", "1"), generation=bound)
    finally:
        await admin.aclose()
        conn.close()


class RecordingConnection(RespConnection):
    """The real connection (the write's, loading the script), keeping each command it sends."""

    def __init__(self, url: str) -> None:
        super().__init__(url, connect_timeout=1, setup=WRITE_CONNECTION_SETUP)
        self.sent: list[bytes] = []

    async def execute(self, command: bytes, *, skip: int = 0, generation: int | None = None) -> Any:
        self.sent.append(command)
        return await super().execute(command, skip=skip, generation=generation)


@pytest.mark.parametrize("windows", [(), (Window("default", 1000, 60), Window("burst", 50, 1))])
async def test_the_write_is_the_transaction_of_its_arguments(
    windows: tuple[Window, ...], redis: Redis, key_prefix: str
) -> None:
    """The writer encodes its transaction from cached parts: it must equal the plain encoding
    of MULTI, the XADD of the entry, the EVALSHA deciding its batches, EXEC."""
    keys = Keys(f"{key_prefix}pre%fix:")
    policy = Policy("ingest", windows) if windows else None
    connection = RecordingConnection(REDIS_URL)
    writer = readings_writer(connection, keys, policy=policy)
    batch = [
        ("dev-a", 7, b'{"x":"100%"}', b""),
        ("dev-b", 12345678901234, b"{}", b"00-" + b"1" * 32 + b"-" + b"2" * 16),
        ("dev-a", 8, b"[]", b""),
    ]
    before = time.time_ns() // 1_000_000
    # Queued before the flusher runs, so the three leave in one write.
    futures = [writer.submit(*item) for item in batch]
    runner = asyncio.create_task(writer.run())
    try:
        results = await asyncio.wait_for(asyncio.gather(*futures), timeout=5)
    finally:
        await cancel_and_wait([runner])
        connection.close()
    after = time.time_ns() // 1_000_000

    [command] = connection.sent
    # MULTI (3 lines), then XADD's header, name, key, ID and field: the time received.
    received = command.split(b"\r\n")[13]
    assert before <= int(received) <= after
    # The script the connection loads whenever it connects (SCRIPT LOAD <script>).
    *load, script = WRITE_CONNECTION_SETUP[0].removesuffix(b"\r\n").split(b"\r\n", 6)
    assert load[2::2] == [b"SCRIPT", b"LOAD"]
    sha = hashlib.sha1(script).hexdigest().encode()  # noqa: S324
    entry = encode_write(int(received), [(payload, trace) for *_, payload, trace in batch])
    expected = [
        encode_command([b"MULTI"]),
        encode_command([b"XADD", keys.readings.encode(), b"*", *chain(*entry.items())]),
        encode_command(
            [
                b"EVALSHA",
                sha,
                b"1",  # the stream alone is a key (the state's prefix is an argument)
                keys.readings.encode(),
                keys.ingest_state_prefix.encode(),
                b"128",  # the window, in bits
                b"3600000",  # a generation: the TTL, longer than any window of the policy
                received,
                *(policy.args if policy is not None else (b"0", b"0")),
                *chain(*((device.encode(), b"%d" % seq) for device, seq, *_ in batch)),
            ]
        ),
        encode_command([b"EXEC"]),
    ]
    assert command == b"".join(expected)
    assert await redis.script_exists(sha.decode()) == [True]  # the script that wrote them
    assert [r.stored for r in results] == [STORED] * 3
    [(_, fields)] = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.readings))
    assert fields == entry


async def test_a_write_result_names_what_redis_decided(redis: Redis, keys: Keys) -> None:
    connection = RespConnection(REDIS_URL, connect_timeout=1)
    policy = Policy("ingest", (Window("default", 2, 60),))
    writer = readings_writer(connection, keys, policy=policy)
    runner = asyncio.create_task(writer.run())
    try:
        results = [await writer.submit("dev-a", seq, b"{}") for seq in (1, 1, 2)]
    finally:
        await cancel_and_wait([runner])
        connection.close()

    assert [(r.stored, r.verdict, r.window, r.remaining) for r in results] == [
        (STORED, ALLOWED, 1, 1),
        (DUPLICATE, ALLOWED, 1, 0),
        (NOT_ATTEMPTED, REFUSED, 1, 0),
    ]
    assert 0 < results[0].reset_ms <= 30_000 < results[1].reset_ms <= 60_000
    assert (writer.stored, writer.duplicates, writer.refused) == (1, 1, 1)


async def test_a_write_unanswered_for_the_timeout_fails_and_the_next_reconnects() -> None:
    """A server that takes the command and never answers (a frozen Redis): the writes in
    flight fail with a timeout within 1.25 timeouts, and the connection is replaced."""
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(1 << 16):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    writer = readings_writer(
        RespConnection(f"redis://127.0.0.1:{port}/0", connect_timeout=1),
        Keys(f"test-{uuid.uuid4().hex}:"),
        max_in_flight=2,
        timeout=0.2,
    )
    runner = asyncio.create_task(writer.run())
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        first = writer.submit("dev-a", 1, b"{}")
        second = writer.submit("dev-a", 2, b"{}")
        for future in (first, second):
            with pytest.raises(StoreUnavailableError, match="TimeoutError"):
                await asyncio.wait_for(future, timeout=2)
        elapsed = loop.time() - started

        third = writer.submit("dev-a", 3, b"{}")
        with pytest.raises(StoreUnavailableError, match="TimeoutError"):
            await asyncio.wait_for(third, timeout=2)
    finally:
        runner.cancel()
        server.close()
        for connection in connections:
            connection.close()

    assert 0.2 <= elapsed < 0.2 * 1.25 + 0.1
    assert len(connections) == 2  # the first one dropped, the third write on a new one
    assert writer.failed == 3


async def swallowing_server() -> tuple[asyncio.Server, list[asyncio.StreamWriter], list[int]]:
    """A server that takes every command and never answers (a frozen Redis): the server,
    its connections' ends, and (one item each) those the client has closed."""
    connections: list[asyncio.StreamWriter] = []
    ended: list[int] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(1 << 16):
            pass
        ended.append(1)

    return await asyncio.start_server(swallow, "127.0.0.1", 0), connections, ended


async def close_server(server: asyncio.Server, connections: list[asyncio.StreamWriter]) -> None:
    server.close()
    for connection in connections:
        connection.close()
    await asyncio.sleep(0.05)  # the client ends see the close, and close


async def test_a_write_to_a_frozen_server_fails_within_its_timeout_while_it_reconnects() -> None:
    server, connections, _ = await swallowing_server()
    port = server.sockets[0].getsockname()[1]
    timeout = 0.2
    # Set up as the service sets its write connection up (service/app.py).
    connection = RespConnection(
        f"redis://127.0.0.1:{port}/0", connect_timeout=timeout, setup=WRITE_CONNECTION_SETUP
    )
    writer = ReadingsWriter(
        connection,
        Keys(f"test-{uuid.uuid4().hex}:"),
        max_batch=1,
        max_pending=10,
        max_in_flight=4,
        timeout=timeout,
        idempotency_window=128,
        idempotency_ttl=3600,
    )
    runner = asyncio.create_task(writer.run())
    loop = asyncio.get_running_loop()

    async def failed_after(seq: int) -> float:
        started = loop.time()
        with pytest.raises(StoreUnavailableError):
            await asyncio.wait_for(writer.submit("dev-a", seq, b"{}"), timeout=5)
        return loop.time() - started

    try:
        elapsed = await asyncio.gather(*(failed_after(seq) for seq in range(4)))
    finally:
        await cancel_and_wait([runner])
        connection.close()
        await close_server(server, connections)

    assert writer.failed == 4
    assert max(elapsed) < timeout * 1.25 + 0.1


async def test_a_connection_whose_setup_times_out_is_closed() -> None:
    server, connections, ended = await swallowing_server()
    port = server.sockets[0].getsockname()[1]
    connection = RespConnection(
        f"redis://127.0.0.1:{port}/0", connect_timeout=0.1, setup=(command("PING"),)
    )
    try:
        for _ in range(3):
            with pytest.raises(RedisConnectionError, match="timed out connecting"):
                await connection.execute(command("PING"))
        connection.close()
        await asyncio.sleep(0.05)

        assert len(connections) == 3
        assert len(ended) == 3  # each closed by the client that gave up on it
    finally:
        await close_server(server, connections)
