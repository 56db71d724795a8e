"""Telemetry records: one constructor per kind, the same positional tuple on the wire."""

import msgspec
import pytest

from shared.telemetry import (
    Kind,
    Record,
    TelemetryBatch,
    alert_record,
    analysis_record,
    dead_letter_record,
    decode_batch,
    encode_batch,
    http_record,
    persist_record,
    protocol_error_record,
    rate_limited_record,
    ws_close_record,
    ws_message_record,
    ws_open_record,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# Each constructor beside the tuple a reader takes it for, field by field: kind, route,
# method, status, duration in microseconds, size, samples, trace id.
RECORDS: list[tuple[Record, Record]] = [
    (
        http_record("/ingestion/ppg", "POST", 202, 850, 420, 50, TRACE_ID),
        (Kind.HTTP, "/ingestion/ppg", "POST", 202, 850, 420, 50, TRACE_ID),
    ),
    (
        http_record("unmatched", "GET", 404, 90, 0),
        (Kind.HTTP, "unmatched", "GET", 404, 90, 0, 0, None),
    ),
    (
        ws_message_record("/ingestion/ws", 202, 120, 380, 50, None),
        (Kind.WS_MESSAGE, "/ingestion/ws", "WS", 202, 120, 380, 50, None),
    ),
    (ws_open_record("/ingestion/ws"), (Kind.WS_OPEN, "/ingestion/ws", "GET", 101, 0, 0, 0, None)),
    (
        ws_close_record("/ingestion/ws", 1001),
        (Kind.WS_CLOSE, "/ingestion/ws", "GET", 1001, 0, 0, 0, None),
    ),
    (
        rate_limited_record("/ingestion/ppg", "ingest", 429),
        (Kind.RATE_LIMITED, "/ingestion/ppg", "ingest", 429, 0, 0, 0, None),
    ),
    (alert_record("hr_high", "open"), (Kind.ALERT, "hr_high", "open", 0, 0, 0, 0, None)),
    (
        analysis_record(422, 90_000, 2, 1500),
        (Kind.ANALYSIS, "/analyze", "POST", 422, 90_000, 2, 1500, None),
    ),
    (
        persist_record(200, 4_000, 12, 600),
        (Kind.PERSIST, "readings", "COPY", 200, 4_000, 12, 600, None),
    ),
    (
        dead_letter_record("undecodable"),
        (Kind.DEAD_LETTER, "undecodable", "", 0, 0, 0, 0, None),
    ),
    (
        protocol_error_record("header_timeout", 408),
        (Kind.PROTOCOL_ERROR, "header_timeout", "", 408, 0, 0, 0, None),
    ),
]


def test_every_kind_has_a_constructor() -> None:
    assert {built[0] for built, _ in RECORDS} == set(Kind)


@pytest.mark.parametrize(("built", "positional"), RECORDS)
def test_a_constructor_builds_the_positional_tuple(built: Record, positional: Record) -> None:
    assert built == positional
    assert type(built) is tuple


@pytest.mark.parametrize(("built", "positional"), RECORDS)
def test_a_record_round_trips_and_encodes_as_the_positional_tuple(
    built: Record, positional: Record
) -> None:
    """Old and new processes interoperate: the bytes are those of the plain tuple."""
    new = encode_batch(TelemetryBatch("boot-1", 1_764_000_000_000, 3, [built]))
    old = encode_batch(TelemetryBatch("boot-1", 1_764_000_000_000, 3, [positional]))

    decoded = decode_batch(new)

    assert new == old
    assert decoded == TelemetryBatch("boot-1", 1_764_000_000_000, 3, [positional])
    assert decoded.records[0] == built


def test_a_batch_is_a_msgpack_array_of_plain_values() -> None:
    """The sidecar reads records by position: what a reader without this module sees."""
    record = http_record("/ingestion/ppg", "POST", 202, 850, 420, 50, None)

    raw = msgspec.msgpack.decode(encode_batch(TelemetryBatch("b", 7, 0, [record])))

    assert raw == ["b", 7, 0, [[0, "/ingestion/ppg", "POST", 202, 850, 420, 50, None]]]
