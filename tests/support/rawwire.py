"""Requests and WebSocket frames written byte by byte, for what a well-behaved client
library will not send: header bytes that are not UTF-8, fragments, stray opcodes."""

import asyncio
import base64
import contextlib
import os
import struct
from dataclasses import dataclass

from aiohttp import web
from aiohttp.test_utils import TestClient

__all__ = ("RawSocket", "exchange", "frame", "http_request", "ws_handshake")

Client = TestClient[web.Request, web.Application]


def _head(line: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([line, b"Host: localhost", *headers, b"", b""])


def http_request(path: bytes, body: bytes, *headers: bytes) -> bytes:
    head = _head(
        b"POST " + path + b" HTTP/1.1",
        *headers,
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
    )
    return head + body


def ws_handshake(path: bytes, *headers: bytes) -> bytes:
    return _head(
        b"GET " + path + b" HTTP/1.1",
        *headers,
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)),
    )


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame (RFC 6455 5.2): masked, as a client's must be."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status = int((await reader.readline()).split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _connect(client: Client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = client.server.host, client.server.port
    assert host is not None
    assert port is not None
    return await asyncio.open_connection(host, port)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def exchange(client: Client, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    reader, writer = await _connect(client)
    try:
        writer.write(request)
        status, headers = await _read_head(reader)
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        await _close(writer)
    return status, headers, body


@dataclass
class RawSocket:
    """A WebSocket after its handshake: frames out as given, frames in as (opcode, payload)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, client: Client, path: bytes, *headers: bytes) -> "RawSocket":
        reader, writer = await _connect(client)
        writer.write(ws_handshake(path, *headers))
        status, _ = await _read_head(reader)
        if status != 101:
            await _close(writer)
            raise AssertionError(f"handshake answered {status}")
        return cls(reader, writer)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def receive(self, timeout: float = 5) -> tuple[int, bytes]:
        """The next frame; (-1, b"") once the server closed the connection."""
        try:
            async with asyncio.timeout(timeout):
                first, second = await self.reader.readexactly(2)
                n = second & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
                return first & 0x0F, await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            return -1, b""

    async def close_code(self, timeout: float = 5) -> int:
        """Skip frames up to the server's close frame: its code (1005 when it has none)."""
        while True:
            opcode, payload = await self.receive(timeout)
            if opcode == -1:
                return 1006
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    async def close(self) -> None:
        await _close(self.writer)

    async def __aenter__(self) -> "RawSocket":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
