"""OpenTelemetry tracing, set up once per process, that costs an unsampled request ~nothing.

The aiohttp-server instrumentation as it ships builds attributes and a span context for
every request before the sampler says no (BENCHMARKS.md, "What tracing costs a request").
So the process decides first,
itself, with the same rule the SDK's sampler applies: an incoming ``traceparent``'s sampled
flag (parent-based samplers), else the trace-id ratio on a trace id drawn here. Only a
sampled request enters the instrumentation, which then gets that trace id (``_PresetIds``)
and so reaches the same verdict; an unsampled one costs a random draw and a comparison.

Spans leave through a bounded queue to OTLP/HTTP (Jaeger ingests OTLP on 4318), sent in
batches by a task on the process's own event loop (``Tracing.export_ctx``), not by a thread
(see ``_LoopExport``). A collector that is away costs dropped spans, which are counted
(queue full, or an export that failed) and logged once per outage. Before export every span
is reduced to an allow-list of
attributes: no payload values, tokens, query strings or headers.
"""

import asyncio
import collections
import contextlib
import functools
import random
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import ClientError, ClientSession, ClientTimeout, TraceConfig, web
from loguru import logger
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags
from psycopg import AsyncConnection

from .otlp import SpanEncoder
from .redisclient import RedisClient
from .settings import TracingSection
from .tasks import cancel_and_wait
from .version import build_version

__all__ = (
    "TRACEPARENT",
    "Tracing",
    "format_traceparent",
    "links_from",
    "parse_traceparent",
    "remote_context",
    "sanitize_attributes",
    "setup_tracing",
    "traces_endpoint",
)

TRACEPARENT = "traceparent"
_TRACE_ID_LIMIT = (1 << 64) - 1
_ENCODE_SLICE = 16
_LEGACY_JAEGER_PORT = 14268

# What a span may carry to the collector. Everything else is dropped before export.
_ALLOWED_ATTRIBUTES = frozenset(
    {
        "http.method",
        "http.request.method",
        "http.route",
        "http.scheme",
        "url.scheme",
        "http.status_code",
        "http.response.status_code",
        "http.flavor",
        "network.protocol.version",
        "server.address",
        "server.port",
        "net.host.name",
        "net.host.port",
        "net.peer.name",
        "net.peer.port",
        "error.type",
        "db.system",
        "db.system.name",
        "db.name",
        "db.namespace",
        "db.operation",
        "db.operation.name",
        "db.redis.database_index",
        "messaging.system",
        "messaging.operation",
        "messaging.operation.type",
        "messaging.destination.name",
        "messaging.batch.message_count",
        "exception.type",
        "exception.escaped",
        "exception.stacktrace",
    }
)
# SQL is sent with placeholders, never values; Redis statements carry values, so not them.
_SQL_SYSTEMS = frozenset({"postgresql"})
_OWN_PREFIX = "pulsecal."


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``, or None if invalid."""
    if value is None or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    version, trace_hex, span_hex, flags_hex = parts[:4]
    if len(trace_hex) != 32 or len(span_hex) != 16 or len(flags_hex) != 2:
        return None
    if version == "00" and len(parts) != 4:
        return None
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, bool(flags & 1)


def format_traceparent(context: SpanContext) -> str:
    flags = "01" if context.trace_flags.sampled else "00"
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags}"


def remote_context(traceparent: str) -> Context | None:
    """A context whose parent is the remote span ``traceparent`` names (None: invalid)."""
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return None
    flags = TraceFlags(TraceFlags.SAMPLED if parsed[2] else TraceFlags.DEFAULT)
    parent = SpanContext(parsed[0], parsed[1], is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(parent))


def links_from(traceparents: Iterable[str]) -> list[Link]:
    """Links to the sampled spans that wrote these batches (a consumer's span of a batch)."""
    links = []
    for value in traceparents:
        parsed = parse_traceparent(value)
        if parsed is not None and parsed[2]:
            context = SpanContext(
                parsed[0], parsed[1], is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
            )
            links.append(Link(context))
    return links


class _PresetIds(IdGenerator):
    """Random ids, except that the next root trace gets the id the fast decision drew."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._local = threading.local()

    def preset(self, trace_id: int) -> None:
        self._local.trace_id = trace_id

    def generate_span_id(self) -> int:
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        trace_id: int | None = getattr(self._local, "trace_id", None)
        if trace_id is None:
            return self._random.generate_trace_id()
        self._local.trace_id = None
        return trace_id


def sanitize_attributes(attributes: Any) -> dict[str, Any]:
    """The attributes that may leave the process: the allow-list, our own, SQL text."""
    if not attributes:
        return {}
    system = attributes.get("db.system") or attributes.get("db.system.name")
    out = {
        key: value
        for key, value in attributes.items()
        if key in _ALLOWED_ATTRIBUTES or key.startswith(_OWN_PREFIX)
    }
    if system in _SQL_SYSTEMS:
        for key in ("db.statement", "db.query.text"):
            if key in attributes:
                out[key] = attributes[key]
    return out


class _LoopExport(SpanProcessor):
    """Sampled spans, queued (bounded) and sent from the event loop, a few at a time.

    The SDK's batch processor exports from a thread; encoding spans there (pure-Python work
    with the exporter's encoder) holds the GIL while the event loop waits for it after every
    I/O call, which cost the service CPU per request and its p99 under load (BENCHMARKS.md).
    Here ``on_end`` only appends; ``run`` (a task on the service's own loop) encodes a few
    spans at a time with ``SpanEncoder`` (shared/otlp.py, a fraction of the exporter's
    cost), yielding in between, and posts up to ``max_batch`` in one request with aiohttp,
    so the loop never waits on another thread, never stalls for long, and the collector
    never makes a request wait.
    """

    def __init__(self, settings: TracingSection, endpoint: str) -> None:
        self._endpoint = endpoint
        self._max_queue = settings.otel_bsp_max_queue_size
        self._max_batch = min(settings.otel_bsp_max_export_batch_size, self._max_queue, 256)
        self._delay = settings.otel_bsp_schedule_delay_ms / 1000
        self.timeout = settings.otel_exporter_otlp_timeout_ms / 1000
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._encoder = SpanEncoder(sanitize_attributes)
        self.dropped = 0
        self.exported = 0
        self.failed = 0
        self._failing = False

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context or not span.context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            return
        self._queue.append(span)

    def shutdown(self) -> None:
        pass  # what is queued is sent by ``flush`` while the loop still runs

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return not self._queue

    async def run(self, session: ClientSession) -> None:
        while True:
            await asyncio.sleep(self._delay)
            await self.flush(session)

    async def flush(self, session: ClientSession) -> None:
        """Send everything queued now, one batch at a time."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            await self._send(session, batch)

    async def _send(self, session: ClientSession, spans: list[ReadableSpan]) -> None:
        # Encoded a few at a time, the loop free in between. Protobuf messages concatenate
        # into one holding both's repeated fields, so one request still carries the batch.
        parts = []
        for i in range(0, len(spans), _ENCODE_SLICE):
            parts.append(self._encoder.encode(spans[i : i + _ENCODE_SLICE]))
            await asyncio.sleep(0)
        body = b"".join(parts)
        try:
            async with (
                asyncio.timeout(self.timeout),
                session.post(
                    self._endpoint,
                    data=body,
                    headers={"Content-Type": "application/x-protobuf"},
                ) as response,
            ):
                await response.read()
                ok = response.status < 300
        except (ClientError, OSError, TimeoutError):
            ok = False
        if ok:
            self.exported += len(spans)
            if self._failing:
                self._failing = False
                logger.info("tracing: the collector takes spans again")
        else:
            self.failed += len(spans)
            if not self._failing:
                self._failing = True
                logger.warning("tracing: the collector is unreachable; spans are dropped")


def traces_endpoint(settings: TracingSection) -> str:
    """Where the spans go: the OTLP traces endpoint, else the base one, else Jaeger's."""
    if settings.otel_exporter_otlp_traces_endpoint:
        return settings.otel_exporter_otlp_traces_endpoint
    if settings.otel_exporter_otlp_endpoint:
        return settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    if settings.jaeger_endpoint:
        parts = urlsplit(settings.jaeger_endpoint)
        if parts.port == _LEGACY_JAEGER_PORT or parts.path.rstrip("/").endswith("/api/traces"):
            host = parts.hostname or "localhost"
            fixed = urlunsplit((parts.scheme, f"{host}:4318", "/v1/traces", "", ""))
            logger.warning(
                "JAEGER_ENDPOINT={} is Jaeger's legacy Thrift collector (port 14268), which "
                "the OTLP exporter cannot use; sending to {} (Jaeger's OTLP/HTTP port 4318). "
                "Set OTEL_EXPORTER_OTLP_TRACES_ENDPOINT to silence this.",
                settings.jaeger_endpoint,
                fixed,
            )
            return fixed
        return settings.jaeger_endpoint
    return "http://localhost:4318/v1/traces"


def _sampling(settings: TracingSection) -> tuple[Sampler, bool, str]:
    """(SDK sampler, parent-based?, root rule: on, off or ratio)."""
    name = settings.otel_traces_sampler
    ratio = settings.otel_traces_sampler_arg
    root_rule = name.removeprefix("parentbased_")
    root: Sampler = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
    }[root_rule]
    parent_based = name.startswith("parentbased_")
    rule = {"always_on": "on", "always_off": "off", "traceidratio": "ratio"}[root_rule]
    return (ParentBased(root) if parent_based else root), parent_based, rule


@dataclass(eq=False)
class Tracing:
    """A process's tracing: the fast sampling decision, the tracer, the export counters."""

    provider: TracerProvider | None
    parent_based: bool = True
    rule: str = "off"
    bound: int = 0
    ids: _PresetIds | None = None
    processor: _LoopExport | None = None
    _middleware: Callable[..., Awaitable[web.StreamResponse]] | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @property
    def dropped(self) -> int:
        """Spans lost: the queue was full, or the collector did not take them."""
        if self.processor is None:
            return 0
        return self.processor.dropped + self.processor.failed

    def decide(self, traceparent: str | None) -> bool:
        """Would the SDK's sampler sample this request? Presets the trace id if it will."""
        if self.provider is None:
            return False
        parent = parse_traceparent(traceparent) if traceparent is not None else None
        if parent is not None:
            if self.parent_based:
                return parent[2]
            trace_id = parent[0]
        else:
            trace_id = random.getrandbits(128) or 1
        if self.rule == "ratio":
            sampled = (trace_id & _TRACE_ID_LIMIT) < self.bound
        else:
            sampled = self.rule == "on"
        if sampled and parent is None and self.ids is not None:
            self.ids.preset(trace_id)
        return sampled

    @functools.cached_property
    def tracer(self) -> trace.Tracer:
        provider = self.provider or trace.NoOpTracerProvider()
        return provider.get_tracer("pulsecal", build_version())

    async def serve(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> tuple[web.StreamResponse, str | None]:
        """``handler`` inside the full aiohttp-server instrumentation: (response, trace id).
        The response says which trace it was (``traceresponse``)."""
        assert self._middleware is not None
        context: SpanContext | None = None

        async def traced(request: web.Request) -> web.StreamResponse:
            nonlocal context
            context = trace.get_current_span().get_span_context()
            return await handler(request)

        response = await self._middleware(request, traced)
        if context is None or not context.is_valid:
            return response, None
        if not response.prepared:
            response.headers["traceresponse"] = format_traceparent(context)
        return response, f"{context.trace_id:032x}"

    def current_traceparent(self) -> str | None:
        context = trace.get_current_span().get_span_context()
        return format_traceparent(context) if context.is_valid else None

    # The clients a process makes are instrumented one by one (not by patching the
    # libraries for the whole process), so only this process's own calls become spans.

    def client_session(self, timeout: float) -> ClientSession:
        """An aiohttp ``ClientSession`` (the calls to the AI service), its calls traced when
        tracing is on; ``timeout`` in seconds per call."""
        trace_configs: list[TraceConfig] = []
        if self.provider is not None:
            from opentelemetry.instrumentation.aiohttp_client import create_trace_config

            trace_configs.append(create_trace_config(tracer_provider=self.provider))
        return ClientSession(timeout=ClientTimeout(total=timeout), trace_configs=trace_configs)

    def instrument_redis(self, client: RedisClient) -> None:
        if self.provider is not None:
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            RedisInstrumentor.instrument_client(client, tracer_provider=self.provider)

    async def instrument_postgres(self, connection: AsyncConnection[Any]) -> None:
        """A pool's ``configure`` (async, as the pool wants it): every connection it opens."""
        if self.provider is not None:
            from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

            PsycopgInstrumentor.instrument_connection(connection, tracer_provider=self.provider)

    async def export_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup context (put it first): spans leave from the app's own loop while it
        runs, and what is left when it stops (bounded by the export timeout)."""
        del app
        processor = self.processor
        if processor is None:
            yield
            return
        # Its own session, not instrumented: exporting spans makes no spans.
        async with ClientSession() as session:
            task = asyncio.create_task(processor.run(session), name="tracing-export")
            yield
            await cancel_and_wait([task])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2 * processor.timeout):
                    await processor.flush(session)

    async def flush(self) -> None:
        """Send what is queued now."""
        if self.processor is not None:
            async with ClientSession() as session:
                await self.processor.flush(session)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def _server_middleware(provider: TracerProvider) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The aiohttp-server instrumentation's middleware, for the sampled requests only.

    Its instrumentor would put it on every application of the process (all requests pay);
    its module-level state (URL exclusions, semantic-convention mode) is set by
    ``instrument()``, so that runs once and is undone at once: the state stays, the
    application class is the plain one again.
    """
    from opentelemetry.instrumentation.aiohttp_server import (
        AioHttpServerInstrumentor,
        create_aiohttp_middleware,
    )

    instrumentor = AioHttpServerInstrumentor()
    with warnings.catch_warnings():
        # It subclasses web.Application to add itself, which aiohttp frowns upon; the
        # subclass is dropped again right away.
        warnings.simplefilter("ignore", DeprecationWarning)
        instrumentor.instrument(tracer_provider=provider)
    instrumentor.uninstrument()
    middleware: Callable[..., Awaitable[web.StreamResponse]] = create_aiohttp_middleware(
        tracer_provider=provider
    )
    return middleware


def setup_tracing(settings: TracingSection, *, service_name: str) -> Tracing:
    """Tracing for this process, or a disabled one (``TRACING_ENABLED=false``)."""
    if not settings.tracing_enabled:
        return Tracing(provider=None)
    sampler, parent_based, rule = _sampling(settings)
    ids = _PresetIds()
    resource = Resource.create(
        {
            "service.name": service_name,
            "service.version": build_version(),
            "deployment.environment": settings.environment,
            "deployment.environment.name": settings.environment,
            "service.instance.id": settings.pod,
            "k8s.pod.name": settings.pod,
        }
    )
    provider = TracerProvider(resource=resource, sampler=sampler, id_generator=ids)
    endpoint = traces_endpoint(settings)
    processor = _LoopExport(settings, endpoint)
    provider.add_span_processor(processor)

    logger.info(
        "tracing to {} as {} (sampler {}, ratio {})",
        endpoint,
        service_name,
        settings.otel_traces_sampler,
        settings.otel_traces_sampler_arg,
    )
    return Tracing(
        provider=provider,
        parent_based=parent_based,
        rule=rule,
        bound=round(settings.otel_traces_sampler_arg * (_TRACE_ID_LIMIT + 1)),
        ids=ids,
        processor=processor,
        _middleware=_server_middleware(provider),
    )
