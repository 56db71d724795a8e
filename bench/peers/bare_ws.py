"""Baseline peer: the least an aiohttp server can do for ``GET /ingestion/ws``.

Each text message is parsed with orjson and answered with ``{"ack": seq}``. No auth,
validation or storage. Run: ``python bench/peers/bare_ws.py PORT``.
"""

import orjson
import uvloop
from _common import listen_port, raise_fd_limit
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


async def startup(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/ingestion/ws", ingest_ws)
    app.router.add_get("/health/startup", startup)
    return app


def main() -> None:
    raise_fd_limit()
    uvloop.install()
    web.run_app(make_app(), host="127.0.0.1", port=listen_port(), access_log=None, print=None)


if __name__ == "__main__":
    main()
