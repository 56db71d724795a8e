"""What tracing costs one request, sampled and not, against the stock instrumentation.

Run from the repository root, pinned to one core:

    taskset -c 0 .venv/bin/python bench/tracecost.py [--requests 20000] [--rounds 5]

Each row awaits the same trivial aiohttp handler for a mocked ``POST /ingestion/ppg``
(route resolved, as in the server) and reports the time added to it:

- stock instrumentation, not sampled: opentelemetry-instrumentation-aiohttp-server's
  middleware around every request, with a sampler that says no (ratio 0);
- ours, not sampled: ``Tracing.decide`` says no, the handler runs bare;
- ours, sampled: ``decide`` says yes, the request goes through the stock middleware via
  ``Tracing.serve``, and its span is queued for export;
- export, per sampled request: sanitizing and encoding its span to OTLP protobuf, which the
  export task does later on the same loop (the post to the collector is not measured), with
  the service's encoder (shared/otlp.py) and, for comparison, with the OTLP exporter's.

Medians over the rounds, in µs per request. Prints a markdown table.
"""

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from shared.otlp import SpanEncoder, sanitized_span
from shared.settings import ServiceSettings, load_settings
from shared.tracing import Tracing, sanitize_attributes, setup_tracing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _ok(_request: web.Request) -> web.StreamResponse:
    return web.Response(status=202, body=b"{}", content_type="application/json")


async def _request(app: web.Application) -> web.Request:
    request = make_mocked_request("POST", "/ingestion/ppg", app=app)
    match = await app.router.resolve(request)
    match.freeze()
    request._match_info = match
    return request


async def _time(call: Callable[[], Awaitable[object]], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - started) / n * 1e6


def _tracing(ratio: float, sampler: str) -> Tracing:
    settings = replace(
        load_settings({}, ServiceSettings),
        tracing_enabled=True,
        otel_traces_sampler=sampler,
        otel_traces_sampler_arg=ratio,
        otel_exporter_otlp_traces_endpoint="http://127.0.0.1:9/v1/traces",
        otel_bsp_max_queue_size=1_000_000,
    )
    return setup_tracing(settings, service_name="bench")


def _encode_queued(tracing: Tracing) -> tuple[float, float]:
    """µs to sanitize and encode each queued span (the export task's work), with the
    service's encoder and with the exporter's; drops them."""
    assert tracing.processor is not None
    queue = tracing.processor._queue  # the spans the export task would take
    spans = list(queue)
    queue.clear()
    encoder = SpanEncoder(sanitize_attributes)
    encoder.encode(spans[:1])  # its resource and scope, encoded once per process
    started = time.perf_counter()
    encoder.encode(spans)
    ours = time.perf_counter() - started
    started = time.perf_counter()
    encode_spans(
        [sanitized_span(span, sanitize_attributes) for span in spans]
    ).SerializePartialToString()
    theirs = time.perf_counter() - started
    n = max(1, len(spans))
    return ours / n * 1e6, theirs / n * 1e6


async def run(args: argparse.Namespace) -> None:
    app = web.Application()
    app.router.add_post("/ingestion/ppg", _ok)
    request = await _request(app)

    never = _tracing(0.0, "parentbased_traceidratio")
    always = _tracing(1.0, "parentbased_always_on")
    default = _tracing(0.01, "parentbased_traceidratio")
    assert never._middleware is not None
    stock = never._middleware

    async def bare() -> object:
        return await _ok(request)

    async def stock_unsampled() -> object:
        return await stock(request, _ok)

    async def ours(tracing: Tracing) -> object:
        if tracing.decide(request.headers.get("traceparent")):
            return await tracing.serve(request, _ok)
        return await _ok(request)

    rows: dict[str, list[float]] = {
        "bare handler (baseline)": [],
        "stock instrumentation, not sampled": [],
        "ours, not sampled": [],
        "ours, default sampling (1 %)": [],
        "ours, sampled": [],
    }
    export: list[float] = []
    export_stock: list[float] = []
    for _ in range(args.rounds):
        rows["bare handler (baseline)"].append(await _time(bare, args.requests))
        rows["stock instrumentation, not sampled"].append(
            await _time(stock_unsampled, args.requests)
        )
        rows["ours, not sampled"].append(await _time(lambda: ours(never), args.requests))
        rows["ours, default sampling (1 %)"].append(
            await _time(lambda: ours(default), args.requests)
        )
        rows["ours, sampled"].append(await _time(lambda: ours(always), args.requests // 4))
        with_ours, with_stock = _encode_queued(always)
        export.append(with_ours)
        export_stock.append(with_stock)
        for tracing in (never, default):
            assert tracing.processor is not None
            tracing.processor._queue.clear()
    for tracing in (never, always, default):
        tracing.shutdown()

    base = statistics.median(rows["bare handler (baseline)"])
    print(f"Tracing cost per request; {args.requests} requests x {args.rounds} rounds.\n")
    print("| path | µs per request | added to the bare handler, µs |")
    print("| --- | ---: | ---: |")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median - base:+.2f} |")
    for name, values in (
        ("export of a sampled request's span, later, on the loop", export),
        ("the same export with the OTLP exporter's encoder", export_stock),
    ):
        encode = statistics.median(values)
        print(f"| {name} | {encode:.2f} | {encode:+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
