"""The Redis settings the deployment ships (k8s/redis/redis.conf) are what a redis-server
runs with, and they keep what PulseCal's acknowledgements rely on."""

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError, ResponseError

from tests.support.paths import ROOT_DIR
from tests.support.procs import free_port

CONF = ROOT_DIR / "k8s" / "redis" / "redis.conf"


def configured_redis(directory: Path, *overrides: str) -> Iterator[Redis]:
    port = free_port()
    argv = ["redis-server", str(CONF), "--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(
        [*argv, "--dir", str(directory), *overrides], stdout=subprocess.DEVNULL
    )
    client = Redis(port=port, socket_timeout=2)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except (RedisError, OSError):
                assert process.poll() is None, "redis-server refused the configuration"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        process.kill()
        process.wait()


@pytest.fixture
def without_replicas(tmp_path: Path) -> Iterator[Redis]:
    """As a primary that may write without replicas (min-replicas would refuse it all)."""
    yield from configured_redis(tmp_path, "--min-replicas-to-write", "0")


@pytest.fixture
def as_shipped(tmp_path: Path) -> Iterator[Redis]:
    yield from configured_redis(tmp_path)


def test_redis_runs_with_the_shipped_settings(without_replicas: Redis) -> None:
    names = ("appendonly", "appendfsync", "maxmemory-policy", "lazyfree-lazy-expire")
    settings = {name: without_replicas.config_get(name)[name] for name in names}

    assert settings == {
        "appendonly": "yes",
        "appendfsync": "everysec",
        "maxmemory-policy": "noeviction",
        "lazyfree-lazy-expire": "yes",
    }
    assert without_replicas.info("persistence")["aof_enabled"] == 1
    assert without_replicas.set("k", "v")


def test_a_primary_cut_off_from_its_replicas_refuses_writes(as_shipped: Redis) -> None:
    with pytest.raises(ResponseError, match="NOREPLICAS"):
        as_shipped.set("k", "v")
