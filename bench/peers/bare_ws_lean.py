"""Experimental peer: bare_ws with the WebSocket receive path cut short.

Same work as ``bare_ws.py`` (parse with orjson, answer ``{"ack": seq}``), but each text
message is handled inside the frame parser's callback: the socket's message queue is
replaced by one whose ``feed_data`` parses and writes the ack frame to the transport at
once. No future, no task resumed, no ``receive()``/``send_str()`` per message; everything
else (pings, close, errors) still goes through aiohttp's queue. It measures what aiohttp's
per-message WebSocket machinery costs, and so what a service could save by taking text
frames this way. It relies on aiohttp 3.14's private internals (``_reader``, ``_parser``,
the protocol's ``_payload_parser``); the service does not. Run:
``python bench/peers/bare_ws_lean.py PORT`` (``bench/run.py --lean-ws-peer`` adds it).
"""

from typing import Any

import orjson
from _common import serve_route
from aiohttp import WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader

MAX_MSG = 1 << 20


class _AckingQueue(WebSocketDataQueue):  # type: ignore[misc]
    def __init__(self, request: web.Request, loop: Any) -> None:
        super().__init__(request.protocol, 1 << 16, loop=loop)
        self._transport = request.transport

    def feed_data(self, data: Any, size: int) -> None:
        if data[0] is WSMsgType.TEXT:
            payload = b'{"ack":%d}' % orjson.loads(data[1])["seq"]
            # A server frame is unmasked: FIN + text opcode, then the length (< 126 here).
            self._transport.write(b"\x81%c%s" % (len(payload), payload))
            return
        super().feed_data(data, size)


async def ingest_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=None, max_msg_size=MAX_MSG)
    await ws.prepare(request)
    queue = _AckingQueue(request, ws._loop)
    ws._reader = queue
    ws._parser = WebSocketReader(queue, MAX_MSG, compress=False, decode_text=True)
    # The client sends its first message only after the 101, so nothing was parsed yet.
    request.protocol._payload_parser = ws._parser
    async for msg in ws:
        if msg.type is WSMsgType.ERROR:
            break
    return ws


if __name__ == "__main__":
    serve_route("GET", "/ingestion/ws", ingest_ws)
