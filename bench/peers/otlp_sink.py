"""A stand-in trace collector for the benchmark: takes OTLP/HTTP posts and discards them.

Run: ``python bench/peers/otlp_sink.py PORT``. It answers like a collector (200, empty
protobuf), so the service's exporter does all of its real work: encode, compress, post.
"""

from _common import listen_port
from aiohttp import web


async def take(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


def main() -> None:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", take)
    web.run_app(app, host="127.0.0.1", port=listen_port(), access_log=None, print=None)


if __name__ == "__main__":
    main()
