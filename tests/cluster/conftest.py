"""One real Redis Cluster (three primaries, three replicas) for the tests of this package.

It starts when the first test asks for it and stops at the end of the session; each test
gets it whole (every node up, every replica linked) and empty. Without ``redis-server`` and
``redis-cli`` the tests fail, saying so: they must run wherever the suite runs.
"""

from collections.abc import AsyncIterator, Iterator

import pytest

from shared.redisclient import RedisClient, connect
from shared.settings import ServiceSettings
from tests.support.cluster import LocalCluster, missing_binaries
from tests.support.settings import for_program


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    missing = missing_binaries()
    if missing:
        pytest.fail(f"{', '.join(missing)} not on PATH: the Redis Cluster tests need Redis 7")
    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> LocalCluster:
    """The session's cluster, whole and empty (a test before may have failed a node over)."""
    local_cluster.wait_ok()
    local_cluster.flushall()
    return local_cluster


@pytest.fixture
async def cluster_client(cluster: LocalCluster) -> AsyncIterator[RedisClient]:
    """A cluster client made as the processes make theirs, seeded with one primary."""
    client = connect(cluster.url, cluster=True, connect_timeout=1.0, socket_timeout=2.0)
    yield client
    await client.aclose()


@pytest.fixture
def cluster_settings(settings: ServiceSettings, cluster: LocalCluster) -> ServiceSettings:
    """The test's service settings, pointed at the cluster."""
    return for_program(ServiceSettings, settings, redis_url=cluster.url, redis_cluster=True)
