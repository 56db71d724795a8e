"""A WebSocket whose text messages go to a callback as the frame parser produces them, and
whose replies are written as frames straight to the transport.

aiohttp hands each message to the handler through a queue the handler's task awaits: a
future, a task step, ``receive()`` and ``__anext__`` per message, then ``send_str()`` and the
frame writer for the reply. For a batch of ~1 KB that machinery is a third of what a bare
aiohttp peer spends per message (against the same peer taking text messages here:
``bench/peers/bare_ws_lean.py``, figures in ``BENCHMARKS.md``). ``TextSocket`` takes them here.

This relies on aiohttp internals: the response's ``_post_start``, ``_reader``, ``_parser``
and ``_max_msg_size``, the protocol's ``_payload_parser`` and ``_message_tail``, and the
queue class the parser feeds. Where they are not as expected (``taking_text`` stays False)
the socket is an ordinary aiohttp socket and the handler passes each text message it
receives to the same callback, so nothing but the cost changes. Pings, pongs, close frames,
errors and binary frames always take aiohttp's ordinary way.
"""

import asyncio
import struct
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

# PARSER_INTERNALS: whether the frame parser's internals are as this module expects; when
# False, every socket takes aiohttp's ordinary path (the tests set it so to check that path
# keeps the contract).
try:  # private: the queue between aiohttp's frame parser and receive()
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader

    PARSER_INTERNALS = True
except ImportError:  # pragma: no cover - another aiohttp layout: the ordinary path
    PARSER_INTERNALS = False

__all__ = ("PARSER_INTERNALS", "TextSocket")

# The queue's own flow-control limit, as aiohttp sets it (DEFAULT_CHUNK_SIZE).
_QUEUE_LIMIT = 2**16
# A server frame is unmasked: FIN + text opcode, then the payload length.
_SHORT_HEADERS = tuple(bytes((0x81, n)) for n in range(126))
_TEXT = WSMsgType.TEXT


def _frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return _SHORT_HEADERS[n] + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


if PARSER_INTERNALS:

    class _TextTaker(WebSocketDataQueue):
        """The parser's queue: text messages go to ``on_text``, everything else is queued."""

        __slots__ = ("_on_text",)

        def __init__(
            self, protocol: Any, *, loop: asyncio.AbstractEventLoop, on_text: Callable[[str], None]
        ) -> None:
            super().__init__(protocol, _QUEUE_LIMIT, loop=loop)
            self._on_text = on_text

        def feed_data(self, data: Any, size: int) -> None:
            if data[0] is _TEXT:  # WSMessage(type, data, extra)
                self._on_text(data[1])
            else:
                super().feed_data(data, size)


class TextSocket(web.WebSocketResponse):
    """``on_text`` gets each text message, called from the protocol's ``data_received``
    when ``taking_text``, else by the handler for each text message it receives. It must not
    raise. Replies go out with ``send_text_frame``."""

    # In slots, not in the instance dict: four more entries there make every socket's dict
    # grow into a larger table (~1.5 KB a socket, measured with 10k idle sockets).
    __slots__ = ("_on_text", "_transport", "payload_writer", "taking_text")

    def __init__(self, on_text: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_text = on_text
        self._transport: asyncio.Transport | None = None
        self.taking_text = False
        self.payload_writer: AbstractStreamWriter | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter:
        # Before the handshake: a message taken while it drains is answered on this transport.
        self._transport = request.transport
        self.payload_writer = await super().prepare(request)
        return self.payload_writer

    def _post_start(self, request: web.BaseRequest, *args: Any, **kwargs: Any) -> None:
        protocol: Any = request.protocol
        # Bytes that came with the handshake are parsed as soon as the parser is set: a
        # client that spoke before its 101 keeps the ordinary path.
        tail = getattr(protocol, "_message_tail", None)
        super()._post_start(request, *args, **kwargs)
        if not PARSER_INTERNALS or tail != b"" or self._compress:
            return
        if getattr(protocol, "_payload_parser", None) is not getattr(self, "_parser", object()):
            return
        old = getattr(self, "_reader", None)
        if not isinstance(old, WebSocketDataQueue) or old._size:
            return
        queue = _TextTaker(protocol, loop=self._loop, on_text=self._on_text)  # type: ignore[arg-type]
        parser = WebSocketReader(queue, self._max_msg_size, compress=False, decode_text=True)
        self._reader = queue
        self._parser = parser
        protocol._payload_parser = parser
        self.taking_text = True

    def send_text_frame(self, text: str) -> bool:
        """Write one text frame now; False (and nothing written) once our close frame went out
        or the transport is closing."""
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            return False
        transport.write(_frame(text.encode()))
        return True
