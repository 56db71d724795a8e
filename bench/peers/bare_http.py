"""Baseline peer: the least an aiohttp server can do for ``POST /ingestion/ppg``.

Reads the body, parses it with orjson and answers 202 with the service's reply shape.
No auth, validation, storage, metrics or logs. Run: ``python bench/peers/bare_http.py PORT``.
"""

import orjson
from _common import serve_route
from aiohttp import web


async def ingest(request: web.Request) -> web.Response:
    batch = orjson.loads(await request.read())
    reply = {"accepted": len(batch["ppg"]), "seq": batch["seq"], "duplicate": False}
    return web.Response(status=202, body=orjson.dumps(reply), content_type="application/json")


if __name__ == "__main__":
    serve_route("POST", "/ingestion/ppg", ingest)
