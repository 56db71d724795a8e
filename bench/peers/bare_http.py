"""Baseline peer: the least an aiohttp server can do for ``POST /ingestion/ppg``.

Reads the body, parses it with orjson and answers 202 with the service's reply shape.
No auth, validation, storage, metrics or logs. Run: ``python bench/peers/bare_http.py PORT``.
"""

import orjson
import uvloop
from _common import listen_port, raise_fd_limit
from aiohttp import web


async def ingest(request: web.Request) -> web.Response:
    batch = orjson.loads(await request.read())
    reply = {"accepted": len(batch["ppg"]), "seq": batch["seq"], "duplicate": False}
    return web.Response(status=202, body=orjson.dumps(reply), content_type="application/json")


async def startup(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/ingestion/ppg", ingest)
    app.router.add_get("/health/startup", startup)
    return app


def main() -> None:
    raise_fd_limit()
    uvloop.install()
    web.run_app(make_app(), host="127.0.0.1", port=listen_port(), access_log=None, print=None)


if __name__ == "__main__":
    main()
