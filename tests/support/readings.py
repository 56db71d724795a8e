"""The readings stream read back batch by batch, as the worker reads it.

A write of the service adds one entry carrying every batch it stored (``encode_write``), an
older service one entry per batch (``encode_entry``): tests that check what reached the
stream count batches, never entries, and decode both formats with ``decode_entries``.
"""

from collections.abc import Sequence
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

from shared.keys import Keys
from shared.readings import ReadingsEntry, decode_entries

__all__ = ("StreamEntries", "batches_of", "stored_batches", "stream_batches")

# redis-py types stream entries as Optional throughout; without decode_responses they are:
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


def batches_of(entries: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> list[ReadingsEntry]:
    """Every batch of these ``XRANGE`` entries, in order (entries in either format)."""
    return [batch for _, fields in entries for batch in decode_entries(fields)]


async def stream_batches(redis: Redis, keys: Keys) -> list[ReadingsEntry]:
    """Every batch in the readings stream, in order."""
    return batches_of(cast(StreamEntries, await redis.xrange(keys.readings)))


async def stored_batches(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every batch in the readings stream, in order, as the JSON the device sent."""
    return [msgspec.json.decode(b.batch) for b in await stream_batches(redis, keys)]
