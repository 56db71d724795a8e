"""Devices sending over HTTP against a service process, every answer kept (``Outcome``)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

import psycopg
from aiohttp import ClientSession, ClientTimeout

from tests.support.env import Device
from tests.support.outcomes import Outcome, send_http

__all__ = ("acked", "device_load", "rows_per_batch")


@contextlib.asynccontextmanager
async def device_load(
    url: str, devices: list[Device], *, pace: float = 0.01, first_seq: int = 0
) -> AsyncIterator[list[Outcome]]:
    """Each device sends its next seq, again and again, whatever the last answer was."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def sender(session: ClientSession, device: Device) -> None:
        seq = first_seq
        while not stop.is_set():
            outcomes.append(await send_http(session, url, device, seq))
            seq += 1
            await asyncio.sleep(pace)

    async with ClientSession(timeout=ClientTimeout(total=5)) as session:
        tasks = [asyncio.create_task(sender(session, d)) for d in devices]
        try:
            yield outcomes
        finally:
            stop.set()
            await asyncio.gather(*tasks)


def acked(outcomes: Iterable[Outcome]) -> set[tuple[str, int]]:
    return {o.batch for o in outcomes if o.status == 202}


async def rows_per_batch(
    database_url: str, device_ids: Iterable[str]
) -> dict[tuple[str, int], int]:
    """How many rows of ``readings`` each (device, seq) has."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT device_id, seq, count(*) FROM readings WHERE device_id = ANY(%s)"
            " GROUP BY device_id, seq",
            (list(device_ids),),
        )
        return {(d, int(s)): int(n) for d, s, n in await cursor.fetchall()}
