"""What a process wrote to its telemetry stream, read back as the sidecar reads it."""

from redis.asyncio import Redis

from shared.keys import Keys
from shared.reporting import Telemetry
from shared.telemetry import BATCH_FIELD, Record, decode_batch

__all__ = ("read_records",)


async def read_records(
    redis: Redis, keys: Keys, pod: str, *, flush: Telemetry | None = None
) -> list[Record]:
    """Every record in ``pod``'s stream; ``flush``: that process's telemetry, written out
    first (its buffer is otherwise flushed only on its interval)."""
    if flush is not None:
        await flush.flush()
    entries = await redis.xrange(keys.telemetry(pod))
    return [r for _, fields in entries for r in decode_batch(fields[BATCH_FIELD]).records]
