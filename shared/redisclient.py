"""The redis-py client of a process: one Redis server, or a Redis Cluster (``REDIS_CLUSTER``).

Code that takes a client takes ``RedisClient`` and uses what both kinds answer alike: commands
on one key, or on keys of one hash tag (``shared/keys.py``), scripts whose keys share a slot,
transactions on one slot. What differs is made explicit here rather than at each call:

- ``REDIS_ERRORS``: what a failure to get an answer from Redis raises, to catch and retry on.
  A cluster client raises some (no reachable node, a slot nobody serves) as
  ``RedisClusterException``, which is not a ``RedisError``: a loop that retried on
  ``RedisError`` alone would die on them instead of trying again.
- ``connect``: how each kind is built. The cluster client retries a command a few times with
  a short backoff, refreshing its slot map after a connection error, so after a primary
  fails its commands go to the promoted replica without the process restarting; the single
  server's client does not retry (its callers do, on their own schedule).
"""

from typing import TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisClusterException, RedisError

__all__ = ("REDIS_ERRORS", "RedisClient", "connect")

RedisClient: TypeAlias = Redis | RedisCluster

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)

# A failover takes the cluster's node timeout and an election: these retries bridge a command
# sent meanwhile only when it is short; the callers' own retries cover the rest.
_CLUSTER_RETRIES = 3
_CLUSTER_BACKOFF = ExponentialBackoff(cap=1.0, base=0.1)


def connect(
    url: str,
    *,
    cluster: bool,
    connect_timeout: float,
    socket_timeout: float,
) -> RedisClient:
    """A client of ``url``: the server, or with ``cluster`` a seed of the cluster (any node;
    the client learns the others from it and follows the slot map as it changes)."""
    if cluster:
        return RedisCluster.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(_CLUSTER_BACKOFF, _CLUSTER_RETRIES),
            health_check_interval=30,
        )
    return Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )
