"""In-memory device token cache, loaded at startup and refreshed in the background.

Requests never query Postgres. A refresh reads only devices changed recently (with a
look-back that covers transactions committing out of timestamp order), so a revoked or
rotated token stops working within one refresh interval (``TOKEN_REFRESH_INTERVAL``, 5 s by
default) plus the time of that query. While Postgres is unreachable the cache keeps serving
what it last knew.
"""

import asyncio
import datetime as dt
import hashlib

from loguru import logger
from psycopg import Error as PsycopgError
from psycopg_pool import AsyncConnectionPool

from .devices import TokenChange, load_token_changes

__all__ = ("TokenCache", "TokenRefresher")

_LOOKBACK = dt.timedelta(seconds=60)
_BEARER = "Bearer "


class TokenCache:
    def __init__(self) -> None:
        self._device_by_hash: dict[bytes, str] = {}
        self._hash_by_device: dict[str, bytes] = {}
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

    def apply(self, changes: list[TokenChange], *, full: bool) -> None:
        if full:
            self._device_by_hash.clear()
            self._hash_by_device.clear()
        for change in changes:
            old = self._hash_by_device.pop(change.device_id, None)
            if old is not None:
                self._device_by_hash.pop(old, None)
            if change.active:
                self._device_by_hash[change.token_hash] = change.device_id
                self._hash_by_device[change.device_id] = change.token_hash
            if self.newest_change is None or change.updated_at > self.newest_change:
                self.newest_change = change.updated_at
        self.loaded = True


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
        rounds = 0
        failing = False
        while True:
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
            await asyncio.sleep(self._interval)
