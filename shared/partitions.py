"""Readings partitions: the readings stream split into P streams, each under its own hash tag.

A device belongs to one partition, ``crc32(device id) mod P`` (stable: the same in every
process, version and machine), and its write state (idempotency and rate limit) lives with
that partition, so a write stays one atomic script per partition. On Redis Cluster a
partition is one hash tag and so one slot; the tags are chosen so that partition ``i`` of
``P`` falls in the ``i``-th of ``P`` equal slices of the slot space. A cluster whose
primaries hold equal runs of slots (what ``redis-cli --cluster create`` and managed services
do) then holds equal numbers of partitions when P is a multiple of the primaries.

P = 1 is the single stream under ``{ingest}`` of the layout before partitions. A *layout*
is the set of partitions of one P; changing P starts a new layout, and the workers drain the
old one while the services write the new (docs/scaling.md).
"""

import functools
import zlib
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = ("MAX_PARTITIONS", "Partition", "layout", "partition_index")

MAX_PARTITIONS = 1024


@dataclass(frozen=True, slots=True)
class Partition:
    index: int
    count: int
    # The hash tag every key of the partition carries (without the braces).
    tag: str

    @property
    def name(self) -> str:
        """``<index>/<count>``: the label of its metrics."""
        return f"{self.index}/{self.count}"


def _tag(index: int, count: int) -> str:
    if count == 1:
        return "ingest"
    low = index * REDIS_CLUSTER_HASH_SLOTS // count
    high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count
    # The first tag of this partition whose slot is in its slice: found in about
    # ``count`` tries, and the same everywhere.
    attempt = 0
    while True:
        tag = f"ingest:{count}.{index}.{attempt}"
        if low <= key_slot(tag.encode()) < high:
            return tag
        attempt += 1


@functools.cache
def layout(count: int) -> tuple[Partition, ...]:
    """The ``count`` partitions of a layout."""
    if not 1 <= count <= MAX_PARTITIONS:
        raise ValueError(f"a layout has 1 to {MAX_PARTITIONS} partitions, not {count}")
    return tuple(Partition(i, count, _tag(i, count)) for i in range(count))


def partition_index(device_id: str, count: int) -> int:
    """The partition of ``count`` a device's batches go to."""
    return zlib.crc32(device_id.encode()) % count if count > 1 else 0
