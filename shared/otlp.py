"""Finished spans to an OTLP/protobuf ``ExportTraceServiceRequest``, written directly.

The exporter's encoder builds a protobuf message object per span, attribute and value and
then serializes them, all of it on the service's event loop (its cost per span and this
encoder's: BENCHMARKS.md, "What tracing costs a request"). This writes the same bytes (field
for field, in field order, as the reference encoder's output serializes;
``tests/service/test_tracing.py`` holds the two equal) from the spans' own data in one pass, with
each resource and instrumentation scope encoded once per process. The attributes of spans,
events and links go through the caller's ``sanitize`` on the way (so no count of dropped
attributes is sent: the SDK's counts would tell nothing about what the allow-list removed).
"""

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind

__all__ = ("SpanEncoder", "sanitized_span")

Sanitize = Callable[[Any], Mapping[str, Any]]

# Field tags (field number << 3 | wire type), pre-encoded.
_LEN = 2
_KIND_NUMBER = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
# SpanFlags: the context says whether it is remote (bit 8) and, if so, that it is (bit 9).
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_FLAGS_LOCAL = b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE)  # field 16, fixed32
_FLAGS_REMOTE = b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)
_LINK_FLAGS_LOCAL = b"\x35" + struct.pack("<I", _HAS_IS_REMOTE)  # field 6, fixed32
_LINK_FLAGS_REMOTE = b"\x35" + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)
_pack_fixed64 = struct.Struct("<Q").pack
_pack_double = struct.Struct("<d").pack


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 on the wire: two's complement, ten bytes
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: tag byte (fields 1-15), length, payload."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def _string(tag: int, value: str) -> bytes:
    return _field(tag, value.encode()) if value else b""


def _any_value(value: Any) -> bytes:
    """An ``AnyValue``'s bytes (the oneof member is set even when it holds its default)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(0x32, _key_values(0x0A, {str(k): v for k, v in value.items()}))
    raise TypeError(f"cannot encode a {type(value).__name__} attribute value")


def _key_value(tag: int, key: str, value: Any) -> bytes:
    return _field(tag, _string(0x0A, key) + _field(0x12, _any_value(value)))


def _key_values(tag: int, attributes: Mapping[str, Any] | None) -> bytes:
    """Each attribute as a ``KeyValue`` in repeated field ``tag``; one of a type OTLP
    cannot carry (the SDK lets none through) is left out, as the reference encoder does."""
    if not attributes:
        return b""
    out = []
    for key, value in attributes.items():
        try:
            out.append(_key_value(tag, key, value))
        except TypeError:
            continue
    return b"".join(out)


# Scalar attributes repeat from span to span (method, route, status, host...): each one's
# bytes are kept, keyed by its type too (True == 1 == 1.0 as dict keys). Bounded.
_CACHED_ATTRIBUTES = 4096
_SCALARS = (str, bool, int, float)


def _uint(tag: int, value: int) -> bytes:
    """A varint field (fields 1-15), left out when it holds 0."""
    return bytes((tag,)) + _varint(value) if value else b""


class SpanEncoder:
    """Encodes batches of finished spans; keeps each resource's and scope's bytes, and
    those of recurring attributes. Spans are grouped by their resource object."""

    def __init__(self, sanitize: Sanitize) -> None:
        self._sanitize = sanitize
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[InstrumentationScope | None, bytes] = {}
        self._attributes: dict[tuple[int, str, type, Any], bytes] = {}

    def _key_values(self, tag: int, attributes: Mapping[str, Any] | None) -> bytes:
        """``_key_values`` of the sanitized attributes, from the cache where it can."""
        attributes = self._sanitize(attributes)
        if not attributes:
            return b""
        cache = self._attributes
        out = []
        for key, value in attributes.items():
            kind = type(value)
            cached = cache.get((tag, key, kind, value)) if kind in _SCALARS else None
            if cached is None:
                try:
                    cached = _key_value(tag, key, value)
                except TypeError:
                    continue
                if kind in _SCALARS:
                    if len(cache) >= _CACHED_ATTRIBUTES:
                        cache.clear()
                    cache[tag, key, kind, value] = cached
            out.append(cached)
        return b"".join(out)

    def encode(self, spans: Iterable[ReadableSpan]) -> bytes:
        """One ``ExportTraceServiceRequest``, spans grouped by resource, then scope."""
        # By identity: a Resource hashes by serializing its attributes to JSON, and
        # a process has one per tracer provider.
        grouped: dict[int, tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = {}
        for span in spans:
            resource = span.resource
            group = grouped.get(id(resource))
            if group is None:
                group = grouped[id(resource)] = (resource, {})
            group[1].setdefault(span.instrumentation_scope or None, []).append(self._span(span))
        out = []
        for resource, scopes in grouped.values():
            body = [_field(0x0A, self._resource(resource))]
            for scope, encoded in scopes.items():
                scope_spans = _field(0x0A, self._scope(scope)) + b"".join(
                    _field(0x12, span) for span in encoded
                )
                if scope is not None:
                    scope_spans += _string(0x1A, scope.schema_url or "")
                body.append(_field(0x12, scope_spans))
            body.append(_string(0x1A, resource.schema_url or ""))
            out.append(_field(0x0A, b"".join(body)))
        return b"".join(out)

    def _resource(self, resource: Resource) -> bytes:
        # Keyed by identity, the resource kept with its bytes so that its id stays its own.
        cached = self._resources.get(id(resource))
        if cached is None:
            if len(self._resources) > 64:
                self._resources.clear()
            cached = self._resources[id(resource)] = (
                resource,
                _key_values(0x0A, resource.attributes),
            )
        return cached[1]

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            if len(self._scopes) > 64:
                self._scopes.clear()
            if scope is None:
                encoded = b""
            else:
                encoded = (
                    _string(0x0A, scope.name)
                    + _string(0x12, scope.version or "")
                    + _key_values(0x1A, scope.attributes)
                )
            self._scopes[scope] = encoded
        return encoded

    def _span(self, span: ReadableSpan) -> bytes:
        context = span.get_span_context()
        assert context is not None
        parent = span.parent
        trace_state = context.trace_state
        parts = [
            b"\x0a\x10",
            context.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            context.span_id.to_bytes(8, "big"),
        ]
        if trace_state:
            parts.append(_string(0x1A, ",".join(f"{k}={v}" for k, v in trace_state.items())))
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts += (_string(0x2A, span.name), b"\x30", _varint(_KIND_NUMBER[span.kind]))
        if span.start_time is not None:
            parts += (b"\x39", _pack_fixed64(span.start_time))
        if span.end_time is not None:
            parts += (b"\x41", _pack_fixed64(span.end_time))
        parts.append(self._key_values(0x4A, span.attributes))
        for event in span.events:
            parts.append(
                _field(
                    0x5A,
                    b"\x09"
                    + _pack_fixed64(event.timestamp)
                    + _string(0x12, event.name)
                    + self._key_values(0x1A, event.attributes),
                )
            )
        for link in span.links:
            context = link.context
            parts.append(
                _field(
                    0x6A,
                    b"\x0a\x10"
                    + context.trace_id.to_bytes(16, "big")
                    + b"\x12\x08"
                    + context.span_id.to_bytes(8, "big")
                    + self._key_values(0x22, link.attributes)
                    + (_LINK_FLAGS_REMOTE if context.is_remote else _LINK_FLAGS_LOCAL),
                )
            )
        status = span.status
        parts.append(
            _field(
                0x7A,
                _string(0x12, status.description or "") + _uint(0x18, status.status_code.value),
            )
        )
        parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
        return b"".join(parts)


def sanitized_span(span: ReadableSpan, sanitize: Sanitize) -> ReadableSpan:
    """``span`` as ``SpanEncoder`` sends it, as a span: its attributes, its events' and its
    links' through ``sanitize``. For the exporter's own encoder (comparisons, benchmarks)."""
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=sanitize(span.attributes),
        events=[Event(e.name, sanitize(e.attributes), e.timestamp) for e in span.events],
        links=[Link(link.context, sanitize(link.attributes)) for link in span.links],
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
