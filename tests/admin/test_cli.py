"""``pulsecal-admin``: migrations and device registration against a real Postgres."""

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.support.env import POSTGRES_URL


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """An empty schema, so ``db upgrade`` starts from nothing."""
    schema = f"a_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def admin(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from admin.__main__ import main; main()", *args],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_db_upgrade_creates_the_schema_and_is_idempotent(fresh_database: str) -> None:
    first = admin(fresh_database, "db", "upgrade")
    second = admin(fresh_database, "db", "upgrade")

    assert (first.returncode, second.returncode) == (0, 0)
    assert "applied: 1" in first.stdout
    assert "applied: none" in second.stdout


def test_device_add_prints_a_token_that_is_stored_only_hashed(fresh_database: str) -> None:
    admin(fresh_database, "db", "upgrade")

    result = admin(fresh_database, "device", "add", "watch-1")

    token = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0
    assert len(token) > 40
    with psycopg.connect(fresh_database) as conn:
        row = conn.execute("SELECT token_hash FROM devices WHERE device_id = 'watch-1'").fetchone()
        dump = str(conn.execute("SELECT * FROM devices").fetchall())
    assert row is not None
    assert bytes(row[0]) == hashlib.sha256(token.encode()).digest()
    assert token not in dump


def test_adding_an_existing_device_needs_rotate(fresh_database: str) -> None:
    admin(fresh_database, "db", "upgrade")
    first = admin(fresh_database, "device", "add", "watch-2").stdout.splitlines()[-1]

    again = admin(fresh_database, "device", "add", "watch-2")
    rotated = admin(fresh_database, "device", "add", "watch-2", "--rotate")

    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert rotated.returncode == 0
    assert rotated.stdout.splitlines()[-1] != first


def test_revoke_and_list(fresh_database: str) -> None:
    admin(fresh_database, "db", "upgrade")
    admin(fresh_database, "device", "add", "watch-3")
    admin(fresh_database, "device", "add", "watch-4")

    revoked = admin(fresh_database, "device", "revoke", "watch-3")
    missing = admin(fresh_database, "device", "revoke", "nobody")
    listing = admin(fresh_database, "device", "list").stdout.splitlines()

    assert revoked.returncode == 0
    assert missing.returncode == 1
    states = {line.split("\t")[0]: line.split("\t")[2] for line in listing}
    assert states["watch-4"] == "active"
    assert states["watch-3"].startswith("revoked")


def test_invalid_device_id_is_refused(fresh_database: str) -> None:
    admin(fresh_database, "db", "upgrade")

    result = admin(fresh_database, "device", "add", "bad id!")

    assert result.returncode == 2


def test_unreachable_database_is_one_clear_line() -> None:
    result = admin("postgresql://postgres@127.0.0.1:1/x", "device", "list")

    assert result.returncode == 1
    assert result.stderr.startswith("pulsecal-admin: cannot reach the database")
