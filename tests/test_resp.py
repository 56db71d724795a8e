"""The write path's own Redis connection: database selection, errors, reconnection."""

import asyncio
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.resp import RespConnection, encode_command


def command(*args: str) -> bytes:
    return encode_command([a.encode() for a in args])


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
