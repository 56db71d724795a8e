"""Wire format of the telemetry a process writes for its sidecar.

The service appends one compact record per request or WebSocket event to a buffer and
writes the buffer as one stream entry (field ``b``) of msgpack; the sidecar decodes whole
batches. ``dropped_total`` is cumulative per process instance (``boot_id``), so a reader
can count drops even when it missed entries.
"""

import enum

import msgspec

__all__ = (
    "BATCH_FIELD",
    "Heartbeat",
    "Kind",
    "Record",
    "TelemetryBatch",
    "decode_batch",
    "decode_heartbeat",
    "encode_batch",
    "encode_heartbeat",
)

BATCH_FIELD = b"b"


class Kind(enum.IntEnum):
    HTTP = 0
    WS_MESSAGE = 1
    WS_OPEN = 2
    WS_CLOSE = 3


# kind, route template, method, status, duration in microseconds, request bytes,
# samples accepted, trace id of a sampled request (else None).
Record = tuple[int, str, str, int, int, int, int, str | None]


class TelemetryBatch(msgspec.Struct, array_like=True, gc=False):
    boot_id: str
    sent_ms: int
    dropped_total: int
    records: list[Record]


class Heartbeat(msgspec.Struct, kw_only=True, gc=False):
    pod: str
    program: str
    boot_id: str
    pid: int
    version: str
    started_ms: int
    sent_ms: int
    ready: bool
    draining: bool
    rss_bytes: int
    heap_bytes: int
    loop_lag_ms: float
    http_connections: int
    ws_connections: int
    pending_writes: int
    writes_ok: int
    writes_duplicate: int
    writes_failed: int
    write_batches: int
    redis_ok: bool
    backlog: int
    backlog_exceeded: bool
    telemetry_dropped: int
    tokens_loaded: int
    db_pool: dict[str, int]


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(TelemetryBatch)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)


def encode_batch(batch: TelemetryBatch) -> bytes:
    return _batch_encoder.encode(batch)


def decode_batch(data: bytes) -> TelemetryBatch:
    return _batch_decoder.decode(data)


def encode_heartbeat(heartbeat: Heartbeat) -> bytes:
    return msgspec.json.encode(heartbeat)


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat_decoder.decode(data)
