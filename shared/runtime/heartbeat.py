"""The heartbeat loop: the program's heartbeat under ``heartbeat:{pod}``, with a TTL.

The program says how to build its heartbeat (``shared/telemetry.py``'s type for it); the
loop writes one every ``HEARTBEAT_INTERVAL``, and a last one on the way out, so the sidecar
sees the process drain and stop rather than vanish.

With ``seen`` (the registry ``keys.pods_seen`` and the pod), each heartbeat also records the
pod there with the time: how a worker finds, without scanning, the pods gone long enough
for their keys to be removed (``worker/cleaner.py``).
"""

import asyncio
import time
from collections.abc import Callable

from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.telemetry import HeartbeatBase, encode_heartbeat

__all__ = ("HeartbeatPublisher",)


class HeartbeatPublisher:
    def __init__(
        self,
        redis: RedisClient,
        key: str,
        build: Callable[[], HeartbeatBase],
        *,
        interval: float,
        ttl: int,
        seen: tuple[str, str] | None = None,
    ) -> None:
        self._redis = redis
        self._key = key
        self._build = build
        self._interval = interval
        self._ttl = ttl
        self._seen = seen

    async def publish(self) -> None:
        heartbeat = encode_heartbeat(self._build())
        if self._seen is None:
            await self._redis.set(self._key, heartbeat, ex=self._ttl)
            return
        # Two slots on a cluster (the pod's and {pods}): a pipeline, which a cluster client
        # sends to each node, not a transaction.
        registry, pod = self._seen
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key, heartbeat, ex=self._ttl)
            pipe.zadd(registry, {pod: time.time_ns() // 1_000_000})
            await pipe.execute()

    async def run(self) -> None:
        task = asyncio.current_task()
        while True:
            try:
                async with asyncio.timeout(max(self._interval, 1.0)):
                    await self.publish()
            except REDIS_ERRORS:
                pass  # a missing heartbeat is itself the signal the sidecar reports
            # A cancellation that lands while redis-py is mid-command can be swallowed on its
            # way through the client (the task stays "cancelling", nothing is raised): stop
            # here, or the loop would outlive its cancel_and_wait.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(self._interval)
