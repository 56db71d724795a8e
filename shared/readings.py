"""The readings stream's entries and its dead letters: one owner for both formats.

The service writes a readings entry from Lua (``service/store.py``, its script built from the
field names here); everything else that writes one (tests, benchmarks, a re-queue) uses
``encode_entry``, which writes the same fields in the same order. The worker reads entries
with ``decode_entry``. An entry holds:

- ``d`` (``BATCH_FIELD``): the batch exactly as the device sent it (``shared/wire.py``);
- ``r`` (``RECEIVED_FIELD``): when the service received it, epoch milliseconds, decimal;
- ``t`` (``TRACE_FIELD``), only for a sampled request: the traceparent of the span that wrote
  it, so the consumer continues the trace.

A dead letter (the worker's ``readings:dead`` stream) is the original entry's fields, as they
were, plus why it was given up: the ``dl_*`` fields below. Fields keep their names for good:
entries written by an older process must still decode.
"""

from collections.abc import Mapping

import msgspec

__all__ = (
    "BATCH_FIELD",
    "DEAD_LETTER_KINDS",
    "PERSIST_GROUP",
    "RECEIVED_FIELD",
    "TRACE_FIELD",
    "DeadLetter",
    "EntryError",
    "ReadingsEntry",
    "decode_dead_letter",
    "decode_entry",
    "encode_dead_letter",
    "encode_entry",
)

# The consumer group the worker reads the stream as (Postgres is its destination).
PERSIST_GROUP = "persist"

BATCH_FIELD = b"d"
RECEIVED_FIELD = b"r"
TRACE_FIELD = b"t"

# Why an entry was given up (also the ``route`` of the worker's DEAD_LETTER telemetry record):
# not a valid batch; refused by Postgres; delivered WORKER_DEAD_LETTER_AFTER times without
# an acknowledgement.
DEAD_LETTER_KINDS = ("undecodable", "rejected", "redelivered")

# The original entry's fields are kept beside these; their prefix keeps the two apart.
_DEAD_LETTER_PREFIX = b"dl_"
_DL_ID = b"dl_id"
_DL_KIND = b"dl_kind"
_DL_REASON = b"dl_reason"
_DL_DELIVERIES = b"dl_deliveries"
_DL_CONSUMER = b"dl_consumer"
_DL_AT = b"dl_at"

_MISSING = (
    f"the entry has no '{BATCH_FIELD.decode()}' (batch)"
    f" or '{RECEIVED_FIELD.decode()}' (received at) field"
)
_NOT_MS = f"'{RECEIVED_FIELD.decode()}' is not epoch milliseconds: "


class EntryError(ValueError):
    """Fields that are not an entry of this format; the message says which is wrong."""


class ReadingsEntry(msgspec.Struct, frozen=True, gc=False):
    """One readings entry. ``batch`` is undecoded: the reader decides how far to parse it.
    ``received`` is the time received as stored (decimal digits, checked), which a COPY line
    takes as it is; ``received_ms`` is the same as a number."""

    batch: bytes
    received: bytes
    traceparent: bytes | None = None

    @property
    def received_ms(self) -> int:
        return int(self.received)


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """A readings entry given up, and why. ``fields`` are the original entry's, as they were
    (so it may be undecodable, and it can be added to the readings stream again as is)."""

    entry_id: bytes
    kind: str
    reason: str
    deliveries: int
    consumer: str
    at_ms: int
    fields: dict[bytes, bytes]


def encode_entry(
    batch: bytes, received_ms: int, traceparent: bytes | None = None
) -> dict[bytes, bytes]:
    """The fields of the entry the service's write script adds for this batch (an empty
    ``traceparent`` is none, as there), in its order: the ``XADD`` field-value pairs."""
    fields = {BATCH_FIELD: batch, RECEIVED_FIELD: b"%d" % received_ms}
    if traceparent:
        fields[TRACE_FIELD] = traceparent
    return fields


def decode_entry(fields: Mapping[bytes, bytes]) -> ReadingsEntry:
    """The entry of an ``XREAD``/``XRANGE`` reply's fields; ``EntryError`` if it is not one.
    Fields it does not know are ignored, so a newer writer may add some."""
    batch = fields.get(BATCH_FIELD)
    received = fields.get(RECEIVED_FIELD)
    if batch is None or received is None:
        raise EntryError(_MISSING)
    if not received.isdigit():
        raise EntryError(f"{_NOT_MS}{received[:40]!r}")
    return ReadingsEntry(batch, received, fields.get(TRACE_FIELD))


def encode_dead_letter(
    entry_id: bytes,
    fields: Mapping[bytes, bytes],
    *,
    kind: str,
    reason: str,
    deliveries: int,
    consumer: str,
    at_ms: int,
) -> dict[bytes, bytes]:
    """The dead-letter stream's fields for the readings entry ``entry_id`` with ``fields``."""
    return {
        **fields,
        _DL_ID: entry_id,
        _DL_KIND: kind.encode(),
        _DL_REASON: reason.encode(),
        _DL_DELIVERIES: b"%d" % deliveries,
        _DL_CONSUMER: consumer.encode(),
        _DL_AT: b"%d" % at_ms,
    }


def decode_dead_letter(fields: Mapping[bytes, bytes]) -> DeadLetter:
    """A dead-letter stream entry's fields; ``EntryError`` if one of its own is missing."""
    try:
        return DeadLetter(
            entry_id=fields[_DL_ID],
            kind=fields[_DL_KIND].decode(errors="replace"),
            reason=fields[_DL_REASON].decode(errors="replace"),
            deliveries=int(fields[_DL_DELIVERIES]),
            consumer=fields[_DL_CONSUMER].decode(errors="replace"),
            at_ms=int(fields[_DL_AT]),
            fields={k: v for k, v in fields.items() if not k.startswith(_DEAD_LETTER_PREFIX)},
        )
    except (KeyError, ValueError) as e:
        raise EntryError(f"not a dead letter: {e}") from e
