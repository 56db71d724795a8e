"""Baseline peer: the least an aiohttp server can do for ``GET /ingestion/ws``.

Each text message is parsed with orjson and answered with ``{"ack": seq}``. No auth,
validation or storage. Run: ``python bench/peers/bare_ws.py PORT``.
"""

import orjson
from _common import serve_route
from aiohttp import WSMsgType, web


async def ingest_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=None, max_msg_size=1 << 20)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            batch = orjson.loads(msg.data)
            await ws.send_str(orjson.dumps({"ack": batch["seq"]}).decode())
        elif msg.type is WSMsgType.ERROR:
            break
    return ws


if __name__ == "__main__":
    serve_route("GET", "/ingestion/ws", ingest_ws)
