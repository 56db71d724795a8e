"""Raw HTTP over a socket, for what no well-behaved client sends: a request as bytes (maybe
in parts, with pauses), and the answer as the server wrote it, or the close."""

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

__all__ = ("Answer", "converse", "parse_answer")

TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Answer:
    """What came back: ``status`` None when the connection closed without an answer."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    raw: bytes
    closed_after: float  # seconds from the first byte sent to the close

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answer(raw: bytes, closed_after: float = 0.0) -> Answer:
    if not raw:
        return Answer(None, {}, b"", raw, closed_after)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is not None:
        body = body[: int(length)]
    return Answer(int(status_line.split()[1]), headers, body, raw, closed_after)


async def converse(
    port: int, parts: Sequence[bytes | float], *, timeout: float = TIMEOUT
) -> Answer:
    """Send ``parts`` (a float: pause that long) while reading, until the server closes. A
    server that closes while parts are still being sent ends the sending there."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    received = bytearray()

    async def read() -> None:
        try:
            while chunk := await reader.read(65536):
                received.extend(chunk)
        except ConnectionError:
            pass  # a reset after the answer: what came before it stands

    reading = asyncio.create_task(read())
    try:
        async with asyncio.timeout(timeout):
            for part in parts:
                if reading.done():
                    break
                if isinstance(part, float):
                    await asyncio.wait([reading], timeout=part)
                    continue
                try:
                    writer.write(part)
                    await writer.drain()
                except ConnectionError:
                    break
            await reading
        return parse_answer(bytes(received), time.monotonic() - started)
    finally:
        reading.cancel()
        writer.close()
