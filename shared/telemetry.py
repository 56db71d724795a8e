"""Wire format of the telemetry a process writes for its sidecar.

The service appends one compact record per request or WebSocket event to a buffer and
writes the buffer as one stream entry (field ``b``) of msgpack; the sidecar decodes whole
batches. ``dropped_total`` is cumulative per process instance (``boot_id``), so a reader
can count drops even when it missed entries.

Record kinds (``Kind``; a record is ``Record``: kind, route, method, status, duration in
microseconds, size, samples, trace id). New kinds are only ever appended; a reader counts a
kind it does not know rather than failing.

- ``HTTP``: one request: route template, method, status, duration, request bytes, samples.
- ``WS_MESSAGE`` / ``WS_OPEN`` / ``WS_CLOSE``: WebSocket events (status: the answer's status,
  or the close code).
- ``RATE_LIMITED``: see the comment at the enum.
- ``ALERT`` (worker): an alert changed. route = the rule (``hr_high``, ``hr_low``,
  ``spo2_low``, ``silence``), method = ``open`` or ``clear``; the rest 0 / None. Counting the
  ``open`` records by route gives ``alerts_created_total{rule}``.
- ``ANALYSIS`` (worker): an analysis job finished. route = ``/analyze``, method = ``POST``,
  status = 200 completed, 204 skipped (too little data in the window, the AI not called),
  422 the AI refused the window, 500 failed after its retries (or expired waiting for an
  open circuit); duration = the job's time including retries; size = attempts; samples =
  PPG samples sent.
- ``PERSIST`` (worker): one group of readings committed to Postgres (or not). route =
  ``readings``, method = ``COPY``, status = 200 committed, 503 the database was unavailable
  (the group is retried), 422 some entries were rejected (left for a retry, then dead
  letters); duration = the transaction's time; size = rows inserted (duplicates excluded);
  samples = PPG samples in those rows.
- ``DEAD_LETTER`` (worker): one readings entry moved to the dead-letter stream. route = why:
  ``undecodable`` (not a valid batch), ``rejected`` (the database refused it),
  ``redelivered`` (delivered ``WORKER_DEAD_LETTER_AFTER`` times without an acknowledgement).
- ``PROTOCOL_ERROR``: a request refused below the routes (a head the HTTP parser refused, a
  body that broke its framing or encoding, a head or body that arrived too slowly:
  ``shared/httpserver.py``). route = the kind, one of ``PROTOCOL_ERROR_KINDS``; method = "";
  status = the status the refusal calls for (the one answered, unless a route answered it).

The heartbeat is one JSON object per process, of its program's type: ``ServiceHeartbeat`` or
``WorkerHeartbeat``, told apart by ``program`` (the console script's name). Both carry the
fields of ``HeartbeatBase``. Fields are only ever appended, with defaults, so an older reader
still decodes a newer heartbeat and a newer reader an older one; fields of the other program
(which heartbeats of one shared struct used to carry as zeros) are ignored.
"""

import enum
from typing import ClassVar, Final

import msgspec

__all__ = (
    "ALERT_RULES",
    "BATCH_FIELD",
    "PROTOCOL_ERROR_KINDS",
    "SERVICE_PROGRAM",
    "WORKER_PROGRAM",
    "Heartbeat",
    "HeartbeatBase",
    "Kind",
    "PostgresStats",
    "Record",
    "ServiceHeartbeat",
    "TelemetryBatch",
    "WorkerHeartbeat",
    "alert_record",
    "analysis_record",
    "dead_letter_record",
    "decode_batch",
    "decode_heartbeat",
    "encode_batch",
    "encode_heartbeat",
    "http_record",
    "persist_record",
    "protocol_error_record",
    "rate_limited_record",
    "ws_close_record",
    "ws_message_record",
    "ws_open_record",
)

BATCH_FIELD = b"b"


class Kind(enum.IntEnum):
    HTTP = 0
    WS_MESSAGE = 1
    WS_OPEN = 2
    WS_CLOSE = 3
    # A request or message over a rate-limit policy: route, method = the policy's name,
    # status 429 when refused, 200 when let through by a policy in shadow mode.
    RATE_LIMITED = 4
    # The worker's (see the module docstring).
    ALERT = 5
    ANALYSIS = 6
    PERSIST = 7
    DEAD_LETTER = 8
    # A request refused below the routes (see the module docstring).
    PROTOCOL_ERROR = 9


# What a PROTOCOL_ERROR record's route may be. A reader counts any other value as "other".
PROTOCOL_ERROR_KINDS = (
    "bad_request_line",
    "bad_version",
    "http2_preface",
    "tls_handshake",
    "bad_request_target",
    "request_line_too_long",
    "bad_header",
    "header_too_large",
    "bad_content_length",
    "bad_transfer_encoding",
    "bad_chunked_encoding",
    "unsupported_content_encoding",
    "unsupported_expectation",
    "bad_content_encoding",
    "incomplete_body",
    "header_timeout",
    "body_timeout",
    "other",
)


# kind, route template, method, status, duration in microseconds, request bytes,
# samples accepted, trace id of a sampled request (else None). Built by the constructors
# below, one per kind; the sidecar reads it by position.
Record = tuple[int, str, str, int, int, int, int, str | None]

# Read once: on Python 3.11 an enum member read off its class costs more than the rest of
# a record, and records are built on the ingest path.
_HTTP: Final = Kind.HTTP
_WS_MESSAGE: Final = Kind.WS_MESSAGE
_WS_OPEN: Final = Kind.WS_OPEN
_WS_CLOSE: Final = Kind.WS_CLOSE
_RATE_LIMITED: Final = Kind.RATE_LIMITED
_ALERT: Final = Kind.ALERT
_ANALYSIS: Final = Kind.ANALYSIS
_PERSIST: Final = Kind.PERSIST
_DEAD_LETTER: Final = Kind.DEAD_LETTER
_PROTOCOL_ERROR: Final = Kind.PROTOCOL_ERROR


def http_record(
    route: str,
    method: str,
    status: int,
    duration_us: int,
    size: int,
    samples: int = 0,
    trace_id: str | None = None,
) -> Record:
    """One HTTP request (``size``: the request's declared bytes)."""
    return (_HTTP, route, method, status, duration_us, size, samples, trace_id)


def ws_message_record(
    route: str, status: int, duration_us: int, size: int, samples: int, trace_id: str | None
) -> Record:
    """One WebSocket message, answered with ``status``."""
    return (_WS_MESSAGE, route, "WS", status, duration_us, size, samples, trace_id)


def ws_open_record(route: str) -> Record:
    return (_WS_OPEN, route, "GET", 101, 0, 0, 0, None)


def ws_close_record(route: str, code: int) -> Record:
    return (_WS_CLOSE, route, "GET", code, 0, 0, 0, None)


def rate_limited_record(route: str, policy: str, status: int) -> Record:
    """A request over ``policy``: ``status`` 429 when refused, 200 when shadow mode let it by."""
    return (_RATE_LIMITED, route, policy, status, 0, 0, 0, None)


def alert_record(rule: str, action: str) -> Record:
    return (_ALERT, rule, action, 0, 0, 0, 0, None)


def analysis_record(status: int, duration_us: int, attempts: int, samples: int) -> Record:
    return (_ANALYSIS, "/analyze", "POST", status, duration_us, attempts, samples, None)


def persist_record(status: int, duration_us: int, rows: int, samples: int) -> Record:
    return (_PERSIST, "readings", "COPY", status, duration_us, rows, samples, None)


def dead_letter_record(reason: str) -> Record:
    return (_DEAD_LETTER, reason, "", 0, 0, 0, 0, None)


def protocol_error_record(kind: str, status: int) -> Record:
    """``kind``: one of ``PROTOCOL_ERROR_KINDS``."""
    return (_PROTOCOL_ERROR, kind, "", status, 0, 0, 0, None)


class TelemetryBatch(msgspec.Struct, array_like=True, gc=False):
    boot_id: str
    sent_ms: int
    dropped_total: int
    records: list[Record]


# The rules of the worker's ALERT records (their route): every one is a series of
# ``alerts_created_total{rule}``, 0 until it first opens.
ALERT_RULES = ("hr_high", "hr_low", "spo2_low", "silence")

# The programs that write a heartbeat: the ``program`` of each, its console script's name.
SERVICE_PROGRAM = "pulsecal-service"
WORKER_PROGRAM = "pulsecal-worker"


class HeartbeatBase(msgspec.Struct, kw_only=True, gc=False, tag_field="program"):
    """What every program's heartbeat says of its process."""

    # The console script that sent it: the tag that picks the type on decoding.
    program: ClassVar[str]
    pod: str
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
    redis_ok: bool
    telemetry_dropped: int
    # Connection pool: size, available, waiting.
    db_pool: dict[str, int] = {}
    # Spans lost (collector away or queue full), log lines Logstash missed.
    spans_dropped: int = 0
    log_lines_dropped: int = 0


class ServiceHeartbeat(HeartbeatBase, tag=SERVICE_PROGRAM):
    program: ClassVar[str] = SERVICE_PROGRAM
    http_connections: int = 0
    ws_connections: int = 0
    pending_writes: int = 0
    writes_ok: int = 0
    writes_duplicate: int = 0
    writes_failed: int = 0
    write_batches: int = 0
    # Batches stored on the primary but answered 503: too few replicas had them in time.
    writes_unreplicated: int = 0
    # What an ack means (ACK_MODE) and the replicas it waits for (0 with "primary"); the
    # Redis written to as last seen: "primary", "replica" or "unknown", its replicas online
    # and their largest lag.
    ack_mode: str = "primary"
    ack_replicas: int = 0
    redis_role: str = "unknown"
    redis_replicas_online: int = 0
    redis_replication_lag_seconds: int = 0
    # The readings backlog (largest lag + pending of any group).
    backlog: int = 0
    backlog_exceeded: bool = False
    tokens_loaded: int = 0
    # Rate-limit decisions made per process while Redis was away.
    rate_limit_fallbacks: int = 0


class PostgresStats(msgspec.Struct, kw_only=True, gc=False):
    """The database as a worker measured it (every ~30 s; the same in every worker pod).

    measured_ms: when; connections: this database's backends (``pg_stat_activity``) by state,
    spaces and parentheses of Postgres's names made underscores (``idle_in_transaction``),
    ``unknown`` for a backend without one; database_bytes: ``pg_database_size``;
    readings_partitions_ahead: daily partitions of ``readings`` for days after today (UTC);
    readings_oldest_day_ms: the first day of the oldest daily partition kept, ms since the
    epoch at 00:00 UTC (0: none)."""

    measured_ms: int
    connections: dict[str, int] = {}
    database_bytes: int = 0
    readings_partitions_ahead: int = 0
    readings_oldest_day_ms: int = 0


class WorkerHeartbeat(HeartbeatBase, tag=WORKER_PROGRAM):
    """queue_depth: analysis jobs not yet picked up by any worker (the same figure in every
    worker pod); queue_jobs_active: this process's jobs in progress; readings_lag: readings
    stream entries (each a write's batches) not yet persisted by the persist group
    (undelivered + unacknowledged); dead_letters:
    entries in the dead-letter stream; rows_persisted / samples_persisted: this process's
    totals since it started (boot_id); ai_circuit: ``closed``, ``open`` or ``half-open``;
    partition_backlog: per readings partition (named ``"<index>/<count>"``, ``"0/1"`` for
    a single stream), the entries awaiting its persist group (undelivered + unacknowledged).
    Every worker measures every partition, so the figures are the same in every worker pod;
    postgres: the database's figures (``PostgresStats``; None until measured, and from a
    worker before them)."""

    program: ClassVar[str] = WORKER_PROGRAM
    queue_depth: int = 0
    queue_jobs_active: int = 0
    readings_lag: int = 0
    dead_letters: int = 0
    rows_persisted: int = 0
    samples_persisted: int = 0
    alerts_open: int = 0
    ai_circuit: str = "closed"
    partition_backlog: dict[str, int] = {}
    postgres: PostgresStats | None = None
    # Gone pods whose keys this process removed since it started (worker/cleaner.py).
    pods_removed: int = 0


Heartbeat = ServiceHeartbeat | WorkerHeartbeat


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(TelemetryBatch)
_heartbeat_encoder = msgspec.json.Encoder()
_heartbeat_decoder: msgspec.json.Decoder[Heartbeat] = msgspec.json.Decoder(Heartbeat)


def encode_batch(batch: TelemetryBatch) -> bytes:
    return _batch_encoder.encode(batch)


def decode_batch(data: bytes) -> TelemetryBatch:
    return _batch_decoder.decode(data)


def encode_heartbeat(heartbeat: HeartbeatBase) -> bytes:
    return _heartbeat_encoder.encode(heartbeat)


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat_decoder.decode(data)
