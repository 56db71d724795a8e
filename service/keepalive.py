"""WebSocket keep-alive for every device socket from one task, instead of timers per socket.

aiohttp's own ``heartbeat`` re-arms a timer on every received frame (a ``call_soon`` and a
``call_at`` per message); here a message costs one attribute store. Every ``interval`` one
sweep pings each socket that sent nothing since the previous sweep, and drops each socket
that stayed silent, pong included, for a whole interval after its ping: a dead peer is gone
within two to three intervals.
"""

import asyncio
import contextlib

from aiohttp import web

__all__ = ("Peer", "keep_alive")


class Peer:
    """One device socket as the sweeper sees it; the handler sets ``heard`` per frame."""

    __slots__ = ("dropped", "heard", "pinged", "transport")

    def __init__(self, transport: asyncio.BaseTransport | None) -> None:
        self.transport = transport
        self.heard = True
        self.pinged = False
        self.dropped = False


async def _ping(ws: web.WebSocketResponse) -> None:
    # A peer that stopped reading can leave the ping stuck behind a full buffer; the sweep
    # gives up on it after its own timeout, and the next sweep drops the socket.
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.ping()


async def keep_alive(peers: dict[web.WebSocketResponse, Peer], *, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        pings: list[asyncio.Task[None]] = []
        for ws, peer in list(peers.items()):
            if ws.closed:
                continue
            if peer.heard:
                peer.heard = False
                peer.pinged = False
            elif not peer.pinged:
                peer.pinged = True
                pings.append(asyncio.create_task(_ping(ws)))
            elif peer.transport is not None:
                peer.dropped = True
                peer.transport.abort()  # type: ignore[attr-defined]  # uvloop/asyncio transports
        if pings:
            _, stuck = await asyncio.wait(pings, timeout=interval)
            for task in stuck:
                task.cancel()
