"""The readings stream's entries and its dead letters: one owner for both formats.

The service's write script (``service/store.py``, built from the field names here) adds one
entry per write, carrying every batch that write stored (``encode_write`` writes the same
fields in the same order); everything else decodes with ``decode_entries``. An entry holds:

- ``r`` (``RECEIVED_FIELD``): when the service received the write, epoch milliseconds, decimal;
- ``b`` (``BATCHES_FIELD``): the batches, each exactly as the device sent it
  (``shared/wire.py``), in order, as netstrings: ``<length>:<bytes>,`` one after the other
  (one field rather than one per batch: Redis adds an entry of one long field for less);
- ``t0``, ``t1``, ... (``TRACE_FIELD`` and the batch's index in the entry, from 0), only for a
  batch of a sampled request: the traceparent of the span that wrote it, so the consumer
  continues the trace.

An entry of one batch in the first format, ``d``, ``r`` and ``t`` without an index, is what
``encode_entry`` writes: the service wrote it so before entries carried several batches, a
dead letter keeps one batch so, and either can be added to the stream again as it is. Both
decode, so entries left in the stream by an older service are read after an upgrade.

A dead letter (the worker's ``readings:dead`` stream) is one batch's fields in that
one-batch format, plus why it was given up: the ``dl_*`` fields below, ``dl_index`` being the
batch's index in its original entry. Fields keep their names for good: entries written by an
older process must still decode.
"""

from collections.abc import Mapping, Sequence

import msgspec

__all__ = (
    "BATCHES_FIELD",
    "BATCH_FIELD",
    "DEAD_LETTER_KINDS",
    "PERSIST_GROUP",
    "RECEIVED_FIELD",
    "TRACE_FIELD",
    "DeadLetter",
    "EntryError",
    "ReadingsEntry",
    "decode_dead_letter",
    "decode_entries",
    "decode_entry",
    "encode_dead_letter",
    "encode_entry",
    "encode_write",
    "trace_field",
)

# The consumer group the worker reads the stream as (Postgres is its destination).
PERSIST_GROUP = "persist"

BATCH_FIELD = b"d"
BATCHES_FIELD = b"b"
RECEIVED_FIELD = b"r"
TRACE_FIELD = b"t"

# Why an entry was given up (also the ``route`` of the worker's DEAD_LETTER telemetry record):
# not a valid batch; refused by Postgres; delivered WORKER_DEAD_LETTER_AFTER times without
# an acknowledgement.
DEAD_LETTER_KINDS = ("undecodable", "rejected", "redelivered")

# The original entry's fields are kept beside these; their prefix keeps the two apart.
_DEAD_LETTER_PREFIX = b"dl_"
_DL_ID = b"dl_id"
_DL_INDEX = b"dl_index"
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
_NOT_NETSTRINGS = f"'{BATCHES_FIELD.decode()}' is not netstrings"


def trace_field(index: int) -> bytes:
    """The field of the traceparent of the ``index``-th batch of an entry."""
    return b"%s%d" % (TRACE_FIELD, index)


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
    # The batch's index in its original entry; None for a dead letter of a whole entry, or
    # one written before entries carried several batches.
    index: int | None = None


def encode_entry(
    batch: bytes, received_ms: int, traceparent: bytes | None = None
) -> dict[bytes, bytes]:
    """The fields of a one-batch entry in the first format (an empty ``traceparent`` is
    none), in order: the ``XADD`` field-value pairs of a dead letter's batch or a re-queue."""
    fields = {BATCH_FIELD: batch, RECEIVED_FIELD: b"%d" % received_ms}
    if traceparent:
        fields[TRACE_FIELD] = traceparent
    return fields


def encode_write(
    received_ms: int, batches: Sequence[tuple[bytes, bytes | None]]
) -> dict[bytes, bytes]:
    """The fields of the entry the service's write script adds for a write that stored
    ``batches`` (each the batch and its traceparent, an empty one being none), in its order."""
    fields = {
        RECEIVED_FIELD: b"%d" % received_ms,
        BATCHES_FIELD: b"".join(b"%d:%s," % (len(batch), batch) for batch, _ in batches),
    }
    for i, (_, traceparent) in enumerate(batches):
        if traceparent:
            fields[trace_field(i)] = traceparent
    return fields


def _netstrings(blob: bytes) -> list[bytes]:
    items = []
    at, end = 0, len(blob)
    while at < end:
        colon = blob.find(b":", at, at + 21)
        if colon <= at or not blob[at:colon].isdigit():
            raise EntryError(f"{_NOT_NETSTRINGS}: no length at byte {at}")
        stop = colon + 1 + int(blob[at:colon])
        if blob[stop : stop + 1] != b",":
            raise EntryError(f"{_NOT_NETSTRINGS}: no ',' after the item at byte {at}")
        items.append(blob[colon + 1 : stop])
        at = stop + 1
    if not items:
        raise EntryError(f"{_NOT_NETSTRINGS}: no batch")
    return items


def _received(fields: Mapping[bytes, bytes]) -> bytes:
    received = fields.get(RECEIVED_FIELD)
    if received is None:
        raise EntryError(_MISSING)
    if not received.isdigit():
        raise EntryError(f"{_NOT_MS}{received[:40]!r}")
    return received


def decode_entries(fields: Mapping[bytes, bytes]) -> list[ReadingsEntry]:
    """Every batch of an ``XREAD``/``XRANGE`` reply's entry, in order, in either format;
    ``EntryError`` if it is not an entry. Fields it does not know are ignored, so a newer
    writer may add some."""
    batches = fields.get(BATCHES_FIELD)
    if batches is None or BATCH_FIELD in fields:
        return [decode_entry(fields)]
    received = _received(fields)
    return [
        ReadingsEntry(batch, received, fields.get(trace_field(i)))
        for i, batch in enumerate(_netstrings(batches))
    ]


def decode_entry(fields: Mapping[bytes, bytes]) -> ReadingsEntry:
    """The batch of a one-batch entry in the first format; ``EntryError`` if it is not one."""
    batch = fields.get(BATCH_FIELD)
    if batch is None:
        raise EntryError(_MISSING)
    return ReadingsEntry(batch, _received(fields), fields.get(TRACE_FIELD))


def encode_dead_letter(
    entry_id: bytes,
    fields: Mapping[bytes, bytes],
    *,
    kind: str,
    reason: str,
    deliveries: int,
    consumer: str,
    at_ms: int,
    index: int | None = None,
) -> dict[bytes, bytes]:
    """The dead-letter stream's fields for the readings entry ``entry_id`` with ``fields``
    (one batch's, ``encode_entry``; or a whole entry's that does not decode), ``index`` the
    batch's in that entry."""
    dead = {
        **fields,
        _DL_ID: entry_id,
        _DL_KIND: kind.encode(),
        _DL_REASON: reason.encode(),
        _DL_DELIVERIES: b"%d" % deliveries,
        _DL_CONSUMER: consumer.encode(),
        _DL_AT: b"%d" % at_ms,
    }
    if index is not None:
        dead[_DL_INDEX] = b"%d" % index
    return dead


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
            index=int(fields[_DL_INDEX]) if _DL_INDEX in fields else None,
        )
    except (KeyError, ValueError) as e:
        raise EntryError(f"not a dead letter: {e}") from e
