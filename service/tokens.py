"""In-memory device token cache, loaded at startup and refreshed in the background.

Requests never query Postgres. A refresh reads only devices changed recently (with a
look-back that covers transactions committing out of timestamp order). Refreshes start every
``TOKEN_REFRESH_INTERVAL`` (5 s by default), however long each takes, so a revoked or rotated
token stops working within one interval plus the time of one refresh query: for new
requests, and for the WebSockets already open with it, which the cache tells when it applies
the change (``TokenHolder``; docs/revocation.md). While Postgres is unreachable the cache
keeps serving what it last knew.
"""

import asyncio
import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import Protocol

from loguru import logger
from psycopg import Error as PsycopgError
from psycopg_pool import AsyncConnectionPool

from shared.devices import TokenChange, load_token_changes

__all__ = ("TokenCache", "TokenHolder", "TokenRefresher", "next_refresh_in")

_LOOKBACK = dt.timedelta(seconds=60)
_BEARER = "Bearer "


REVOKED = "the device token was revoked"
REPLACED = "the device token was replaced"


class TokenHolder(Protocol):
    """A connection that stays open on the strength of a token (a device's WebSocket)."""

    def token_revoked(self, reason: str) -> None:
        """The token stopped working (``REVOKED`` or ``REPLACED``). Called once, from the
        refresher's task; must not raise."""


class TokenCache:
    def __init__(self) -> None:
        self._device_by_hash: dict[bytes, str] = {}
        self._hash_by_device: dict[str, bytes] = {}
        # Open connections and the token each was authenticated with. Looked at only when
        # a token goes away, so a connection costs nothing per message.
        self._holders: dict[TokenHolder, bytes] = {}
        self.loaded = False
        self.newest_change: dt.datetime | None = None

    def __len__(self) -> int:
        return len(self._device_by_hash)

    def authenticate(self, authorization: str | None) -> str | None:
        """The device id a ``Bearer`` header stands for, or None."""
        if authorization is None or not authorization.startswith(_BEARER):
            return None
        try:
            token = authorization[len(_BEARER) :].strip().encode()
        except UnicodeEncodeError:
            # aiohttp keeps header bytes that are not UTF-8 as lone surrogates, which no
            # token holds (tokens are ASCII): a wrong token like any other.
            return None
        return self._device_by_hash.get(hashlib.sha256(token).digest())

    def hold(self, holder: TokenHolder, device_id: str) -> None:
        """Tell ``holder`` when the token ``device_id`` was just authenticated with stops
        working. Call it right after ``authenticate`` returned ``device_id``, with no await
        between: the device's current token is then the one that was authenticated."""
        self._holders[holder] = self._hash_by_device[device_id]

    def release(self, holder: TokenHolder) -> None:
        self._holders.pop(holder, None)

    @property
    def holders(self) -> int:
        return len(self._holders)

    def apply(self, changes: list[TokenChange], *, full: bool) -> None:
        # Each token this apply takes away, with its device: their holders are told.
        removed: dict[bytes, str] = {}
        if full:
            removed = self._device_by_hash
            self._device_by_hash = {}
            self._hash_by_device = {}
        for change in changes:
            old = self._hash_by_device.pop(change.device_id, None)
            if old is not None:
                self._device_by_hash.pop(old, None)
                removed[old] = change.device_id
            if change.active:
                self._device_by_hash[change.token_hash] = change.device_id
                self._hash_by_device[change.device_id] = change.token_hash
            if self.newest_change is None or change.updated_at > self.newest_change:
                self.newest_change = change.updated_at
        self.loaded = True
        # Most changes re-read (the look-back) or re-loaded (a full reload) leave the
        # token as it was: only a token that is gone now ends its holders.
        if self._holders and any(h not in self._device_by_hash for h in removed):
            self._end_holders(removed)

    def _end_holders(self, removed: Mapping[bytes, str]) -> None:
        for holder, token_hash in list(self._holders.items()):
            if token_hash in self._device_by_hash or token_hash not in removed:
                continue
            del self._holders[holder]
            reason = REPLACED if removed[token_hash] in self._hash_by_device else REVOKED
            try:
                holder.token_revoked(reason)
            except Exception:  # noqa: BLE001 - one holder's bug must not stop the refresher
                logger.exception("telling a connection its token was revoked failed")


def next_refresh_in(started: float, now: float, interval: float) -> float:
    """Seconds to wait before the next refresh: refreshes start ``interval`` apart, however
    long each took (none waits when one took longer), so a change committed at any moment is
    read by a refresh starting at most ``interval`` later."""
    return max(0.0, started + interval - now)


class TokenRefresher:
    def __init__(
        self,
        cache: TokenCache,
        pool: AsyncConnectionPool,
        *,
        interval: float,
        full_reload_every: int = 120,
    ) -> None:
        self._cache = cache
        self._pool = pool
        self._interval = interval
        self._full_reload_every = full_reload_every

    async def refresh(self, *, full: bool) -> None:
        since = self._cache.newest_change
        if full or since is None:
            since = None
        else:
            since -= _LOOKBACK
        async with self._pool.connection() as conn:
            changes = await load_token_changes(conn, since)
        self._cache.apply(changes, full=since is None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        rounds = 0
        failing = False
        while True:
            started = loop.time()
            try:
                await self.refresh(
                    full=not self._cache.loaded or rounds % self._full_reload_every == 0
                )
            except (PsycopgError, OSError, TimeoutError) as e:
                if not failing:
                    logger.warning("device token refresh failed, serving cached tokens: {}", e)
                failing = True
            else:
                if failing:
                    logger.info("device token refresh recovered ({} tokens)", len(self._cache))
                failing = False
                rounds += 1
            await asyncio.sleep(next_refresh_in(started, loop.time(), self._interval))
