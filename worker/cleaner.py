"""What the system would otherwise leave behind in Redis, removed by a worker.

**Gone pods.** Every heartbeat also records its pod in ``keys.pods_seen`` with the time
(``shared/runtime/heartbeat.py``). A pod not seen for ``POD_KEYS_GRACE`` is gone: its keys
(heartbeat, telemetry stream, sidecar state, all in its ``{<pod>}`` slot) are deleted by one
script that first checks the heartbeat is absent, and it is then removed from the registry
only if its score is still the one read. So a pod that comes back meanwhile keeps its
heartbeat (the script sees it) or its place in the registry (its heartbeat moved the score),
and is looked at again after the grace. Without the registry, finding them would take a
``SCAN`` of every node.

**Idle consumers.** Each worker process reads each partition it owns, and the analysis jobs,
as a consumer of its own (``{pod}:{boot}``); Redis keeps a consumer until it is deleted. One
with nothing pending, idle for ``POD_KEYS_GRACE`` and whose process's heartbeat is gone (or
another process's) is deleted by a script that checks, atomically, that it still has
nothing pending: ``XGROUP DELCONSUMER`` then loses nothing. A dead consumer with entries
pending keeps them until a live worker claims them (``worker/consumers.py``), and goes after.

**Retired layouts.** A layout the workers forgot is noted in ``keys.retired_layouts``
(``worker/partitions.py``). ``RETIRED_DELAY`` later each of its readings streams is deleted by
a script, only if it is empty or every group has been delivered its last entry and has
nothing pending, and no consumer of it read within the delay; the layout is struck off once
none of its streams is left. A late write keeps its stream (or recreates it: the service's
next announcement has it consumed again). A worker that still reads such a stream (one whose
own ``INGEST_PARTITIONS`` it is, during a rollout) and has never been given an entry there is
no consumer Redis shows: when its stream goes, its reader creates the group again
(``worker/groups.py``). Its dead letters and their reasons stay for the operators (capped by
``DEAD_LETTER_MAXLEN``).

Every worker runs a cleaner; a round starts only with the lease (``SET NX PX`` for one
interval), so one works at a time and at most one round runs per interval. Correctness does
not depend on it: every step is a check and a change in one script, or a change conditioned
on what was read, so two cleaners at once delete each key once (the second finds nothing)
and count each pod once (one conditional removal succeeds).
"""

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import cast

from loguru import logger
from redis.exceptions import ResponseError

from shared.keys import Keys
from shared.partitions import MAX_PARTITIONS
from shared.redisclient import REDIS_ERRORS, RedisClient

from .consumers import dead

__all__ = ("KeysCleaner",)

# The pod's keys (heartbeat first), if its heartbeat is absent: how many there were; -1 if
# the heartbeat is there (the pod is alive).
_REMOVE_POD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
return redis.call('DEL', KEYS[2], KEYS[3])
"""

# A member removed only if its score is still the one read.
_FORGET = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

# The consumer deleted only if it exists and has nothing pending: 1 deleted, 0 it was not
# there, -1 it has entries pending. (CREATECONSUMER says whether it existed; a consumer it
# creates is deleted at once.)
_DELETE_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return -1
end
local created = redis.call('XGROUP', 'CREATECONSUMER', KEYS[1], ARGV[1], ARGV[2])
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1 - created
"""

# A retired partition's stream deleted if nothing in it is left to persist and nobody read it
# for ARGV[1] ms: 1 deleted, 0 there was none, -1 entries not persisted, -2 read lately.
_DELETE_STREAM = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local stream = fields(redis.call('XINFO', 'STREAM', KEYS[1]))
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 and stream['length'] > 0 then
  return -1
end
for _, flat in ipairs(groups) do
  local group = fields(flat)
  if stream['length'] > 0 and (group['pending'] > 0
      or group['last-delivered-id'] ~= stream['last-generated-id']) then
    return -1
  end
  for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], group['name'])) do
    if fields(consumer)['idle'] < tonumber(ARGV[1]) then
      return -2
    end
  end
end
return redis.call('DEL', KEYS[1])
"""


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class KeysCleaner:
    """Removes the keys of gone pods, the idle consumers of dead workers and the streams of
    retired layouts; one round per interval among all the workers."""

    # Seconds between a layout's retirement and the deletion of its streams: every worker
    # has stopped reading it long before (each looks every PartitionedPersistence.INTERVAL).
    RETIRED_DELAY = 60.0
    # Pods looked at per round, the oldest first.
    BATCH = 500

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        consumer: str,
        grace: float,
        groups: Callable[[], Iterable[tuple[str, str]]],
        own_layout: int,
        retired_delay: float = RETIRED_DELAY,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._consumer = consumer
        self._grace_ms = int(grace * 1000)
        self._groups = groups
        self._own_layout = own_layout
        self._retired_delay_ms = int(retired_delay * 1000)
        # A round a minute, or four per grace when it is shorter (tests); the lease lasts
        # as long, so the rounds of all the workers together come no more often.
        self.interval = max(0.05, min(60.0, grace / 4))
        self._remove_pod = redis.register_script(_REMOVE_POD)
        self._forget = redis.register_script(_FORGET)
        self._delete_consumer = redis.register_script(_DELETE_CONSUMER)
        self._delete_stream = redis.register_script(_DELETE_STREAM)
        self.pods_removed = 0
        self.keys_removed = 0
        self.consumers_removed = 0
        self.streams_removed = 0

    # ------------------------------------------------------------------ the loop

    async def take_lease(self) -> bool:
        lease_ms = max(1, int(self.interval * 1000))
        return bool(
            await self._redis.set(self._keys.cleaner_lease, self._consumer, nx=True, px=lease_ms)
        )

    async def run_once(self) -> bool:
        """One round if the lease is free; whether it ran."""
        if not await self.take_lease():
            return False
        await self.remove_gone_pods()
        await self.remove_idle_consumers()
        await self.remove_retired_streams()
        return True

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(max(self.interval * 4, 30.0)):
                    await self.run_once()
            except REDIS_ERRORS as e:
                logger.debug("worker: cleaner skipped a round: {}", e)
            except TimeoutError:
                logger.debug("worker: cleaner round cut short; the next goes on")
            await asyncio.sleep(self.interval)

    # ------------------------------------------------------------------ gone pods

    async def remove_gone_pods(self) -> int:
        """The pods not seen for the grace: their keys deleted, then their entry; how many."""
        now = time.time_ns() // 1_000_000
        seen = self._keys.pods_seen
        gone = cast(
            list[tuple[bytes, float]],
            await self._redis.zrangebyscore(
                seen, "-inf", now - self._grace_ms, start=0, num=self.BATCH, withscores=True
            ),
        )
        removed = 0
        for member, score in gone:
            pod = _text(member)
            deleted = int(await self._remove_pod(keys=list(self._keys.pod_keys(pod))))
            if deleted < 0:
                continue  # its heartbeat is there: its next one moves its score
            self.keys_removed += deleted
            if await self._forget(keys=[seen], args=[member, int(score)]):
                removed += 1
                logger.info(
                    "worker: pod {} gone for {:.0f} s: its keys removed",
                    pod,
                    (now - score) / 1000,
                )
        self.pods_removed += removed
        return removed

    # ------------------------------------------------------------------ idle consumers

    async def remove_idle_consumers(self) -> int:
        """The dead consumers with nothing pending, idle for the grace; how many."""
        removed = 0
        for stream, group in self._groups():
            try:
                consumers = await self._redis.xinfo_consumers(stream, group)
            except ResponseError:
                continue  # no such stream or group (yet)
            idle = [
                _text(c["name"])
                for c in consumers
                if not int(c["pending"])
                and int(c["idle"]) >= self._grace_ms
                and _text(c["name"]) != self._consumer
            ]
            for name in sorted(await dead(self._redis, self._keys, idle)):
                if int(await self._delete_consumer(keys=[stream], args=[group, name])) == 1:
                    removed += 1
                    logger.info(
                        "worker: consumer {} of group {} on {} removed (its process is gone"
                        " and it had nothing pending)",
                        name,
                        group,
                        stream,
                    )
        self.consumers_removed += removed
        return removed

    # ------------------------------------------------------------------ retired layouts

    async def remove_retired_streams(self) -> int:
        """The streams of the layouts retired for the delay, once emptied; how many."""
        now = time.time_ns() // 1_000_000
        retired_key = self._keys.retired_layouts
        retired = cast(
            list[tuple[bytes, float]],
            await self._redis.zrangebyscore(
                retired_key, "-inf", now - self._retired_delay_ms, withscores=True
            ),
        )
        if not retired:
            return 0
        layouts = cast(list[bytes], await self._redis.zrange(self._keys.ingest_layouts, 0, -1))
        announced = {_text(m) for m in layouts}
        removed = 0
        for member, score in retired:
            raw = _text(member)
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_PARTITIONS:
                await self._forget(keys=[retired_key], args=[member, int(score)])
                continue
            count = int(raw)
            if raw in announced:
                # Written again: the workers consume it; retired anew when it is drained.
                await self._forget(keys=[retired_key], args=[member, int(score)])
                continue
            if count == self._own_layout:
                continue  # this worker consumes it (workers disagree during a rollout)
            kept = []
            for partition in self._keys.partitions(count):
                stream = partition.readings
                result = int(
                    await self._delete_stream(keys=[stream], args=[self._retired_delay_ms])
                )
                if result == 1:
                    removed += 1
                    logger.info("worker: stream {} of a retired layout deleted", stream)
                elif result < 0:
                    kept.append(partition.partition.name)
            if kept:
                logger.info(
                    "worker: layout of {} partitions retired, but {} still read or holding"
                    " entries not persisted: kept",
                    count,
                    ", ".join(kept),
                )
                continue
            await self._forget(keys=[retired_key], args=[member, int(score)])
        self.streams_removed += removed
        return removed
