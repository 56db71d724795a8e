"""An app served as ``pulsecal-service`` serves it, and requests written byte by byte.

``pytest-aiohttp``'s test server cancels a handler whose client hangs up
(``handler_cancellation=True``); the service's own runner does not, and the handler then
sees a ``ConnectionResetError`` instead. ``serve`` runs an app either way.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ("Answer", "Served", "exchange", "hang_up_after", "raw_request", "serve")

TIMEOUT = 10.0


@dataclass(frozen=True)
class Served:
    app: web.Application
    host: str
    port: int


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, *, handler_cancellation: bool = False
) -> AsyncIterator[Served]:
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, handler_cancellation=handler_cancellation
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield Served(app, host, port)
    finally:
        await runner.cleanup()


def raw_request(
    method: bytes,
    path: bytes,
    *headers: bytes,
    body: bytes = b"",
    content_length: int | None = None,
) -> bytes:
    """A request as bytes, with a ``Content-Length`` (the body's, unless given) if either."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: localhost", b"Connection: close"]
    lines += headers
    if body or content_length is not None:
        lines.append(
            b"Content-Length: %d" % (len(body) if content_length is None else content_length)
        )
    return b"\r\n".join([*lines, b"", b""]) + body


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


async def exchange(served: Served, request: bytes) -> Answer:
    """``request`` on a fresh connection; the answer, read to the connection's end."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(served.host, served.port)
        try:
            writer.write(request)
            head, _, body = (await reader.read()).partition(b"\r\n\r\n")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


async def hang_up_after(served: Served, request: bytes, *, until: Any) -> None:
    """Send ``request`` (a body shorter than its Content-Length), wait until ``until()``
    says the server is reading it, then drop the connection without a FIN's courtesy."""
    async with asyncio.timeout(TIMEOUT):
        _, writer = await asyncio.open_connection(served.host, served.port)
        writer.write(request)
        await writer.drain()
        while not until():
            await asyncio.sleep(0.001)
        writer.transport.abort()
