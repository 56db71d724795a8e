"""The slot map of a Redis Cluster, for the write path's connections (``resp.py``).

redis-py's cluster client keeps one for its own connections; the write path keeps a
connection per partition on its own transport (``resp.py`` says why), so it keeps its own:
which primary serves each slot, read with ``CLUSTER SLOTS`` from any node it knows. A
connection asks for its slot's primary whenever it connects. The map is read again when a
node answers ``MOVED`` (the slot moved, or a failover promoted a replica) and after a
connection fails (the primary may be gone), at most once per ``REFRESH_EVERY`` seconds.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ("Address", "SlotMap", "parse_redirect")

Address = tuple[str, int]
# Asks one node for ``CLUSTER SLOTS``.
QueryNode = Callable[[Address], Awaitable[list[Any]]]


def parse_redirect(message: str) -> tuple[str, int, Address] | None:
    """(``MOVED`` or ``ASK``, the slot, where to) of a redirect error; None for another."""
    parts = message.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK") or not parts[1].isdigit():
        return None
    host, _, port = parts[2].rpartition(":")
    if not port.isdigit():
        return None
    return parts[0], int(parts[1]), (host, int(port))


class SlotMap:
    """Which primary serves each slot; ``seeds``: the nodes to ask first (REDIS_URL's)."""

    REFRESH_EVERY = 0.1

    def __init__(self, seeds: Sequence[Address], *, query: QueryNode) -> None:
        self._seeds = list(seeds)
        self._query = query
        self._primaries: list[Address | None] = []
        self._known: list[Address] = list(seeds)
        self._stale = True
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Future[None] | None = None

    def invalidate(self) -> None:
        """Read the map again before the next connection (a connection failed)."""
        self._stale = True

    def moved(self, slot: int, address: Address) -> None:
        """A node said the slot is served by ``address``: taken at once, and the whole map
        read again before the next connection (a failover moves many slots)."""
        if self._primaries:
            self._primaries[slot] = address
        self._stale = True

    async def primary(self, slot: int) -> Address:
        if self._stale or not self._primaries:
            await self._refresh()
        address = self._primaries[slot] if self._primaries else None
        if address is None:
            raise RedisConnectionError(f"no Redis Cluster node serves slot {slot}")
        return address

    async def _refresh(self) -> None:
        attempt = self._refreshing
        if attempt is None:
            wait = self._refreshed_at + self.REFRESH_EVERY - time.monotonic()
            attempt = self._refreshing = asyncio.ensure_future(self._read(max(0.0, wait)))
            attempt.add_done_callback(self._refreshed)
        await asyncio.shield(attempt)

    def _refreshed(self, attempt: "asyncio.Future[None]") -> None:
        self._refreshing = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved: each waiter raises its own copy

    async def _read(self, wait: float) -> None:
        if wait > 0 and self._primaries:
            await asyncio.sleep(wait)
        errors = []
        # The nodes of the last map first (the seeds may be gone), then the seeds.
        for address in dict.fromkeys([*self._known, *self._seeds]):
            try:
                reply = await self._query(address)
            except Exception as e:  # noqa: BLE001 - down, or not in cluster mode: the next
                errors.append(f"{address[0]}:{address[1]}: {e}")
                continue
            primaries: list[Address | None] = [None] * 16384
            known: list[Address] = []
            for first, last, primary, *replicas in reply:
                node = _address(primary, address[0])
                for slot in range(int(first), int(last) + 1):
                    primaries[slot] = node
                known.append(node)
                known += [_address(r, address[0]) for r in replicas]
            self._primaries = primaries
            self._known = list(dict.fromkeys(known)) or self._known
            self._stale = False
            self._refreshed_at = time.monotonic()
            return
        raise RedisConnectionError("cannot read the cluster's slot map: " + "; ".join(errors))


def _address(node: Sequence[Any], asked: str) -> Address:
    raw = node[0]
    host = raw.decode() if isinstance(raw, bytes) else str(raw)
    # An empty or unknown host: the node we asked (CLUSTER SLOTS' convention).
    return (host if host and host != "?" else asked, int(node[1]))
