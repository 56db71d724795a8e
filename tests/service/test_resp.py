"""The write path's own Redis connection: database selection, errors, reconnection."""

import asyncio
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.fastpath.resp import RespConnection, encode_command
from service.ratelimit import Policy, Window
from service.store import _WRITE_BATCH_SHA, ReadingsWriter, StoreUnavailableError, _Pending
from shared.keys import Keys


def command(*args: str) -> bytes:
    return encode_command([a.encode() for a in args])


def readings_writer(
    url: str,
    keys: Keys,
    *,
    max_in_flight: int = 1,
    timeout: float = 1,
    policy: Policy | None = None,
) -> ReadingsWriter:
    return ReadingsWriter(
        RespConnection(url, connect_timeout=1),
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
        with pytest.raises(ResponseError, match="unknown command"):
            await conn.execute(command("NO-SUCH-COMMAND"))
        assert await conn.execute(command("PING")) == b"PONG"
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


@pytest.mark.parametrize("windows", [(), (Window("default", 1000, 60), Window("burst", 50, 1))])
async def test_the_write_command_is_the_evalsha_of_its_arguments(
    windows: tuple[Window, ...],
) -> None:
    """The writer encodes its EVALSHA from cached parts: it must equal the plain encoding."""
    keys = Keys("pre%fix:")
    policy = Policy("ingest", windows) if windows else None
    writer = readings_writer("redis://127.0.0.1:6379", keys, policy=policy)
    future = asyncio.get_running_loop().create_future()
    batch = [
        _Pending("dev-a", 7, b'{"x":"100%"}', future, b""),
        _Pending("dev-b", 12345678901234, b"{}", future, b"00-" + b"1" * 32 + b"-" + b"2" * 16),
        _Pending("dev-a", 8, b"[]", future, b""),
    ]

    command = writer._command(batch)

    device_keys: list[bytes] = []
    for item in batch:
        device_keys.append(f"{keys.seen_prefix}{item.device_id}".encode())
        device_keys += [
            keys.ingest_rate_limit("ingest", w.name, item.device_id).encode() for w in windows
        ]
    received = command.split(b"\r\n")[2 * (3 + 1 + len(device_keys) + 3) + 2]
    assert received.isdigit()
    expected = [
        b"EVALSHA",
        _WRITE_BATCH_SHA,
        b"%d" % (1 + len(device_keys)),
        keys.readings.encode(),
        *device_keys,
        b"128",
        b"112",
        b"3600",
        received,
        *(policy.args if policy is not None else (b"0", b"0")),
    ]
    for item in batch:
        expected += [b"%d" % item.seq, item.payload, item.trace]
    assert command == encode_command(expected)


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
        f"redis://127.0.0.1:{port}/0",
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
