"""The heartbeat loop: the program's heartbeat under ``heartbeat:{pod}``, with a TTL.

The program says how to build its heartbeat (``shared/telemetry.py``'s type for it); the
loop writes one every ``HEARTBEAT_INTERVAL``, and a last one on the way out, so the sidecar
sees the process drain and stop rather than vanish.
"""

import asyncio
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
    ) -> None:
        self._redis = redis
        self._key = key
        self._build = build
        self._interval = interval
        self._ttl = ttl

    async def publish(self) -> None:
        await self._redis.set(self._key, encode_heartbeat(self._build()), ex=self._ttl)

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
