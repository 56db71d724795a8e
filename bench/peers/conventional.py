"""Reference peer: the conventional in-process design, written the way its users write it.

Everything happens inside the request, in the serving process:

- a prometheus_client middleware (``http_request_duration_seconds`` histogram and
  ``http_requests_total`` counter by method/route/status) with a ``/metrics`` route;
- OpenTelemetry's aiohttp-server instrumentation, always on: a ``TracerProvider`` with the
  ``ALWAYS_ON`` sampler and a ``BatchSpanProcessor`` whose exporter discards the spans (it
  only counts them, so a run can check that tracing really was on);
- one loguru JSON line per request (``serialize=True``) to a file;
- one awaited redis-py asyncio ``XADD`` per request before answering 202.

No auth (the Authorization header is ignored) and no validation beyond parsing, the same as
the bare peer. Run: ``python bench/peers/conventional.py PORT`` with ``REDIS_URL`` set;
``LOG_DIR`` (default: a new temporary directory) receives ``requests.log``.

For ablation only, ``CONVENTIONAL_OFF`` may list parts to leave out (comma-separated:
``prometheus``, ``otel``, ``loguru``, ``redis``); the benchmark runs with all of them on.
"""

import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import orjson
import uvloop
from _common import listen_port, raise_fd_limit
from aiohttp import web
from loguru import logger
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from redis.asyncio import Redis

STREAM = "conventional:readings"
OFF = {part.strip() for part in os.environ.get("CONVENTIONAL_OFF", "").split(",") if part.strip()}

REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request duration in seconds",
    ["method", "route", "status"],
)
REQUESTS_TOTAL = Counter(
    "http_requests_total",
    "HTTP requests",
    ["method", "route", "status"],
)
SPANS_EXPORTED = Counter("bench_spans_exported_total", "Spans handed to the discarding exporter")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
redis_key: web.AppKey[Redis] = web.AppKey("redis", Redis)


class DiscardingExporter(SpanExporter):
    """Stands in for an OTLP exporter: the spans are built and batched, then dropped."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        SPANS_EXPORTED.inc(len(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


@web.middleware
async def prometheus_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        labels = (request.method, route, str(status))
        REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - start)
        REQUESTS_TOTAL.labels(*labels).inc()


async def ingest(request: web.Request) -> web.Response:
    start = time.perf_counter()
    body = await request.read()
    batch = orjson.loads(body)
    if "redis" not in OFF:
        await request.app[redis_key].xadd(
            STREAM,
            {
                "device_id": batch["device_id"],
                "seq": batch["seq"],
                "ts": batch["ts"],
                "batch": body,
            },
        )
    logger.info(
        "batch ingested",
        device_id=batch["device_id"],
        seq=batch["seq"],
        samples=len(batch["ppg"]),
        bytes=len(body),
        duration_ms=round((time.perf_counter() - start) * 1000, 3),
    )
    reply = {"accepted": len(batch["ppg"]), "seq": batch["seq"], "duplicate": False}
    return web.Response(status=202, body=orjson.dumps(reply), content_type="application/json")


async def metrics(_request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def startup(request: web.Request) -> web.Response:
    await request.app[redis_key].ping()
    return web.Response(text="ok")


async def redis_client(app: web.Application) -> AsyncIterator[None]:
    redis = Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    app[redis_key] = redis
    yield
    await redis.aclose()


def setup_tracing() -> TracerProvider:
    provider = TracerProvider(
        resource=Resource.create({"service.name": "conventional-ingest"}), sampler=ALWAYS_ON
    )
    provider.add_span_processor(BatchSpanProcessor(DiscardingExporter()))
    trace.set_tracer_provider(provider)
    if "otel" not in OFF:
        AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    return provider


def setup_logging() -> str:
    log_dir = os.environ.get("LOG_DIR") or tempfile.mkdtemp(prefix="conventional-logs-")
    path = os.path.join(log_dir, "requests.log")
    logger.remove()
    if "loguru" not in OFF:
        logger.add(path, serialize=True, level="INFO")
    return path


def make_app() -> web.Application:
    # Instrumentation replaces web.Application, so it must run before the app is built.
    middlewares = [] if "prometheus" in OFF else [prometheus_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=1 << 20)
    app.cleanup_ctx.append(redis_client)
    app.router.add_post("/ingestion/ppg", ingest)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health/startup", startup)
    return app


def main() -> None:
    raise_fd_limit()
    uvloop.install()
    provider = setup_tracing()
    log_path = setup_logging()
    print(f"conventional: logging to {log_path}", flush=True)
    try:
        web.run_app(make_app(), host="127.0.0.1", port=listen_port(), access_log=None, print=None)
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
