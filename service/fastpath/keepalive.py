"""WebSocket keep-alive for every device socket from one task, instead of timers per socket,
and the closing handshake of a shutdown.

aiohttp's own ``heartbeat`` re-arms a timer on every received frame (a ``call_soon`` and a
``call_at`` per message); here a message costs one attribute store. Every ``interval`` one
sweep pings each socket that sent nothing since the previous sweep, and drops each socket
that stayed silent, pong included, for a whole interval after its ping: a dead peer is gone
within two to three intervals.

``close_going_away`` sends a close frame and leaves the socket's handler to read the device's
answer to it. aiohttp's ``close()``, called from outside the handler that reads the socket,
wakes that handler with a "closing" message and closes the connection as soon as the handler
returns, without waiting for the device's close frame: a device answering the close then
writes to a closed connection and sees 1006. This relies on two private parts of aiohttp's
``WebSocketResponse``: ``_writer`` (whose ``close(code, message)`` sends the frame) and
``_set_closed()`` (so that the handler, reading the device's close frame, does not answer it
with a second one); ``tests/service/test_shutdown.py`` trips if they change.
"""

import asyncio
import contextlib

from aiohttp import WSCloseCode, web

__all__ = ("Peer", "close_going_away", "keep_alive")


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


async def close_going_away(ws: web.WebSocketResponse, message: bytes) -> None:
    """Send ``ws`` a close frame with 1001 and return: its handler goes on reading until the
    device's close frame comes (then it ends, and aiohttp closes the connection)."""
    writer = ws._writer
    if ws.closed or writer is None:
        return
    ws._set_closed()
    with contextlib.suppress(ConnectionError):  # the device is gone already
        await writer.close(WSCloseCode.GOING_AWAY, message)
