"""What tracing costs one request, sampled and not, against the stock instrumentation.

Run from the repository root, pinned to one core:

    taskset -c 0 .venv/bin/python bench/tracecost.py [--requests 20000] [--rounds 5]

Each row awaits the same trivial aiohttp handler for a mocked ``POST /ingestion/ppg``
(route resolved, as in the server) and reports the time added to it:

- stock instrumentation, not sampled: opentelemetry-instrumentation-aiohttp-server's
  middleware around every request, with a sampler that says no (ratio 0);
- ours, not sampled: ``Tracing.decide`` says no, the handler runs bare;
- ours, sampled: ``decide`` says yes, the request goes through the stock middleware via
  ``Tracing.serve``, and its span through the sanitizing exporter (which here drops it,
  so no network is measured).

Medians over the rounds, in µs per request. Prints a markdown table.
"""

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from shared.settings import load_settings
from shared.tracing import Tracing, setup_tracing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


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
        load_settings({}),
        tracing_enabled=True,
        otel_traces_sampler=sampler,
        otel_traces_sampler_arg=ratio,
        otel_exporter_otlp_traces_endpoint="http://127.0.0.1:9/v1/traces",
    )
    tracing = setup_tracing(settings, service_name="bench")
    assert tracing.exporter is not None
    tracing.exporter._inner = _Discard()
    return tracing


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
    for tracing in (never, always, default):
        tracing.shutdown()

    base = statistics.median(rows["bare handler (baseline)"])
    print(f"Tracing cost per request; {args.requests} requests x {args.rounds} rounds.\n")
    print("| path | µs per request | added to the bare handler, µs |")
    print("| --- | ---: | ---: |")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median - base:+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
