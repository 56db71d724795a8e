"""shared/otlp.py writes the same bytes as the OTLP exporter's own encoder."""

from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from shared.otlp import SpanEncoder, sanitized_span
from shared.tracing import sanitize_attributes


class _Collect(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans += spans
        return SpanExportResult.SUCCESS


def _provider(resource: Resource, exporter: _Collect) -> TracerProvider:
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


VALUES: dict[str, Any] = {
    "pulsecal.text": "héllo",
    "pulsecal.empty": "",
    "pulsecal.yes": True,
    "pulsecal.no": False,
    "pulsecal.zero": 0,
    "pulsecal.big": 2**62,
    "pulsecal.negative": -5,
    "pulsecal.float": 1.5,
    "pulsecal.float_zero": 0.0,
    "pulsecal.strings": ("a", "", "c"),
    "pulsecal.ints": (1, -2, 300),
    "pulsecal.bools": (True, False),
    "pulsecal.floats": (0.25, -1e300),
    "http.route": "/ingestion/ppg",
    "http.request.header.authorization": "Bearer secret",  # not on the allow-list
}


def _spans() -> list[ReadableSpan]:
    exporter = _Collect()
    api = _provider(
        Resource.create({"service.name": "pulsecal-api", "pod": "p-1"}, schema_url="s://r"),
        exporter,
    )
    worker = _provider(Resource.create({"service.name": "pulsecal-worker"}), exporter)
    remote_parent = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    tracer = api.get_tracer("pulsecal", "1.2.3", schema_url="s://scope")
    with tracer.start_as_current_span(
        "POST /ingestion/ppg",
        context=set_span_in_context(NonRecordingSpan(remote_parent)),
        kind=SpanKind.SERVER,
        attributes=VALUES,
    ) as server:
        server.add_event("retry", {"pulsecal.attempt": 2, "token": "secret"})
        server.add_event("bare")
        with tracer.start_as_current_span("EVALSHA readings", kind=SpanKind.PRODUCER):
            pass
        server.set_status(Status(StatusCode.ERROR, "redis did not answer"))
    other = api.get_tracer("aiohttp-client")
    with other.start_as_current_span("GET", kind=SpanKind.CLIENT) as client:
        client.set_status(Status(StatusCode.OK))
    links = [
        Link(remote_parent, {"pulsecal.batch": 1, "secret": "x"}),
        Link(SpanContext(1, 2, is_remote=False)),
    ]
    consumer = worker.get_tracer("pulsecal")
    with (
        consumer.start_as_current_span("persist readings", kind=SpanKind.CONSUMER, links=links),
        consumer.start_as_current_span("INSERT readings"),
    ):
        pass
    return exporter.spans


def _reference(spans: list[ReadableSpan], sanitize: Any) -> bytes:
    """What the exporter's encoder makes of the spans, reduced by ``sanitize`` first."""
    return encode_spans([sanitized_span(s, sanitize) for s in spans]).SerializeToString()


def _everything(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(attributes or {})


@pytest.mark.parametrize("sanitize", [sanitize_attributes, _everything])
def test_the_encoder_writes_what_the_exporter_writes(sanitize: Any) -> None:
    spans = _spans()
    encoder = SpanEncoder(sanitize)

    ours = encoder.encode(spans)
    again = encoder.encode(spans)  # the resources' and scopes' bytes now come from its cache

    expected = _reference(spans, sanitize)
    assert ExportTraceServiceRequest.FromString(ours) == ExportTraceServiceRequest.FromString(
        expected
    )
    assert ours == expected
    assert again == ours


def test_the_allow_list_applies_to_spans_events_and_links() -> None:
    request = ExportTraceServiceRequest.FromString(
        SpanEncoder(sanitize_attributes).encode(_spans())
    )
    keys = set()
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                keys |= {kv.key for kv in span.attributes}
                for event in span.events:
                    keys |= {kv.key for kv in event.attributes}
                for link in span.links:
                    keys |= {kv.key for kv in link.attributes}

    assert "http.route" in keys
    assert "pulsecal.attempt" in keys
    assert "pulsecal.batch" in keys
    assert not keys & {"http.request.header.authorization", "token", "secret"}


def test_an_empty_batch_is_an_empty_request() -> None:
    assert SpanEncoder(sanitize_attributes).encode([]) == b""
