"""Devices and their tokens in Postgres (the tables are in ``shared/schema.py``).

Tokens are random (256 bits), so a plain SHA-256 is a sound verifier: nothing to brute-force,
and the service can look a token up by its hash without a slow KDF on every request.
"""

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow

__all__ = (
    "Device",
    "DeviceExistsError",
    "DeviceNotFoundError",
    "TokenChange",
    "add_device",
    "hash_token",
    "list_devices",
    "load_token_changes",
    "new_token",
    "revoke_device",
)

TOKEN_PREFIX = "pct_"  # noqa: S105 - a marker that makes leaked tokens greppable, not a secret


class DeviceExistsError(Exception):
    pass


class DeviceNotFoundError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class TokenChange:
    device_id: str
    token_hash: bytes
    active: bool
    updated_at: dt.datetime


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def add_device(
    conn: psycopg.AsyncConnection[TupleRow], device_id: str, *, rotate: bool = False
) -> str:
    """Register a device (or re-issue its token) and return the token, shown only once."""
    token = new_token()
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT revoked_at FROM devices WHERE device_id = %s FOR UPDATE", (device_id,)
        )
        row = await cur.fetchone()
        if row is None:
            await conn.execute(
                "INSERT INTO devices (device_id, token_hash) VALUES (%s, %s)",
                (device_id, hash_token(token)),
            )
        elif row[0] is None and not rotate:
            raise DeviceExistsError(device_id)
        else:
            await conn.execute(
                "UPDATE devices SET token_hash = %s, revoked_at = NULL,"
                " updated_at = clock_timestamp() WHERE device_id = %s",
                (hash_token(token), device_id),
            )
    return token


async def revoke_device(conn: psycopg.AsyncConnection[TupleRow], device_id: str) -> None:
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE devices SET revoked_at = coalesce(revoked_at, now()),"
            " updated_at = clock_timestamp() WHERE device_id = %s",
            (device_id,),
        )
        if cur.rowcount == 0:
            raise DeviceNotFoundError(device_id)


async def list_devices(conn: psycopg.AsyncConnection[TupleRow]) -> list[Device]:
    cur = await conn.execute(
        "SELECT device_id, created_at, revoked_at FROM devices ORDER BY device_id"
    )
    return [Device(*row) for row in await cur.fetchall()]


async def load_token_changes(
    conn: psycopg.AsyncConnection[TupleRow], since: dt.datetime | None
) -> list[TokenChange]:
    """Devices changed after ``since`` (all of them when ``since`` is None), oldest first."""
    if since is None:
        cur = await conn.execute(
            "SELECT device_id, token_hash, revoked_at IS NULL, updated_at FROM devices"
            " ORDER BY updated_at"
        )
    else:
        cur = await conn.execute(
            "SELECT device_id, token_hash, revoked_at IS NULL, updated_at FROM devices"
            " WHERE updated_at > %s ORDER BY updated_at",
            (since,),
        )
    return [TokenChange(row[0], bytes(row[1]), row[2], row[3]) for row in await cur.fetchall()]
