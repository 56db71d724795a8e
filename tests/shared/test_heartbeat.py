"""The heartbeat on the wire: one type per program, told apart by ``program``, the same JSON
field names and values as the single struct both programs used to share wrote."""

from typing import Any

import msgspec
import pytest

from shared.telemetry import (
    SERVICE_PROGRAM,
    WORKER_PROGRAM,
    PostgresStats,
    ServiceHeartbeat,
    WorkerHeartbeat,
    decode_heartbeat,
    encode_heartbeat,
)

# As the shared struct wrote them: every field of both programs, the other's at 0.
SERVICE_JSON = (
    b'{"pod":"pod-a","program":"pulsecal-service","boot_id":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",'
    b'"pid":42,"version":"0.1.0","started_ms":1764000000000,"sent_ms":1764000060000,'
    b'"ready":true,"draining":false,"rss_bytes":83886080,"heap_bytes":41943040,'
    b'"loop_lag_ms":1.5,"http_connections":5,"ws_connections":3,"pending_writes":1,'
    b'"writes_ok":10,"writes_duplicate":1,"writes_failed":2,"write_batches":7,'
    b'"redis_ok":true,"backlog":12,"backlog_exceeded":false,"telemetry_dropped":4,'
    b'"tokens_loaded":2,"db_pool":{"size":2,"available":1,"waiting":0},"queue_depth":0,'
    b'"queue_jobs_active":0,"readings_lag":0,"dead_letters":0,"rows_persisted":0,'
    b'"samples_persisted":0,"alerts_open":0,"ai_circuit":"closed","spans_dropped":6,'
    b'"log_lines_dropped":8,"rate_limit_fallbacks":9}'
)
WORKER_JSON = (
    b'{"pod":"pod-w","program":"pulsecal-worker","boot_id":"cccccccccccccccccccccccccccccccc",'
    b'"pid":43,"version":"0.1.0","started_ms":1764000000000,"sent_ms":1764000060000,'
    b'"ready":true,"draining":true,"rss_bytes":83886080,"heap_bytes":41943040,'
    b'"loop_lag_ms":0.25,"http_connections":0,"ws_connections":0,"pending_writes":0,'
    b'"writes_ok":0,"writes_duplicate":0,"writes_failed":0,"write_batches":0,'
    b'"redis_ok":true,"backlog":0,"backlog_exceeded":false,"telemetry_dropped":0,'
    b'"tokens_loaded":0,"db_pool":{"size":4,"available":3,"waiting":0},"queue_depth":5,'
    b'"queue_jobs_active":2,"readings_lag":17,"dead_letters":1,"rows_persisted":1000,'
    b'"samples_persisted":50000,"alerts_open":3,"ai_circuit":"half-open","spans_dropped":1,'
    b'"log_lines_dropped":2,"rate_limit_fallbacks":0}'
)
SERVICE_ONLY = {
    "http_connections",
    "ws_connections",
    "pending_writes",
    "writes_ok",
    "writes_duplicate",
    "writes_failed",
    "write_batches",
    "backlog",
    "backlog_exceeded",
    "tokens_loaded",
    "rate_limit_fallbacks",
}
WORKER_ONLY = {
    "queue_depth",
    "queue_jobs_active",
    "readings_lag",
    "dead_letters",
    "rows_persisted",
    "samples_persisted",
    "alerts_open",
    "ai_circuit",
}
# What a reader of the shared struct needs in every heartbeat (its fields without defaults).
SHARED_STRUCT_REQUIRED = {
    "pod",
    "program",
    "boot_id",
    "pid",
    "version",
    "started_ms",
    "sent_ms",
    "ready",
    "draining",
    "rss_bytes",
    "heap_bytes",
    "loop_lag_ms",
    "redis_ok",
    "telemetry_dropped",
}


def as_dict(data: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(data)
    return decoded


def test_a_service_heartbeat_of_the_shared_struct_decodes_as_the_services() -> None:
    heartbeat = decode_heartbeat(SERVICE_JSON)

    assert heartbeat == ServiceHeartbeat(
        pod="pod-a",
        boot_id="b" * 32,
        pid=42,
        version="0.1.0",
        started_ms=1764000000000,
        sent_ms=1764000060000,
        ready=True,
        draining=False,
        rss_bytes=83886080,
        heap_bytes=41943040,
        loop_lag_ms=1.5,
        http_connections=5,
        ws_connections=3,
        pending_writes=1,
        writes_ok=10,
        writes_duplicate=1,
        writes_failed=2,
        write_batches=7,
        redis_ok=True,
        backlog=12,
        backlog_exceeded=False,
        telemetry_dropped=4,
        tokens_loaded=2,
        db_pool={"size": 2, "available": 1, "waiting": 0},
        spans_dropped=6,
        log_lines_dropped=8,
        rate_limit_fallbacks=9,
    )
    assert heartbeat.program == SERVICE_PROGRAM


def test_a_worker_heartbeat_of_the_shared_struct_decodes_as_the_workers() -> None:
    heartbeat = decode_heartbeat(WORKER_JSON)

    assert heartbeat == WorkerHeartbeat(
        pod="pod-w",
        boot_id="c" * 32,
        pid=43,
        version="0.1.0",
        started_ms=1764000000000,
        sent_ms=1764000060000,
        ready=True,
        draining=True,
        rss_bytes=83886080,
        heap_bytes=41943040,
        loop_lag_ms=0.25,
        redis_ok=True,
        telemetry_dropped=0,
        db_pool={"size": 4, "available": 3, "waiting": 0},
        queue_depth=5,
        queue_jobs_active=2,
        readings_lag=17,
        dead_letters=1,
        rows_persisted=1000,
        samples_persisted=50000,
        alerts_open=3,
        ai_circuit="half-open",
        spans_dropped=1,
        log_lines_dropped=2,
    )
    assert heartbeat.program == WORKER_PROGRAM


# The service's fields added after the heartbeats above were written, with their defaults.
ADDED_SERVICE_FIELDS = {
    "writes_unreplicated": 0,
    "ack_mode": "primary",
    "ack_replicas": 0,
    "redis_role": "unknown",
    "redis_replicas_online": 0,
    "redis_replication_lag_seconds": 0,
}
# The worker's.
ADDED_WORKER_FIELDS = {"partition_backlog": {}, "postgres": None, "pods_removed": 0}


@pytest.mark.parametrize(
    ("written", "other_programs"),
    [(SERVICE_JSON, WORKER_ONLY), (WORKER_JSON, SERVICE_ONLY)],
    ids=["service", "worker"],
)
def test_each_program_writes_its_fields_as_the_shared_struct_did_and_not_the_others(
    written: bytes, other_programs: set[str]
) -> None:
    rewritten = as_dict(encode_heartbeat(decode_heartbeat(written)))

    expected = {k: v for k, v in as_dict(written).items() if k not in other_programs}
    # Fields added since, at their defaults: an older process's heartbeat still reads.
    added = {k: v for k, v in rewritten.items() if k not in as_dict(written)}
    assert {k: v for k, v in rewritten.items() if k not in added} == expected
    assert added == (ADDED_SERVICE_FIELDS if written == SERVICE_JSON else ADDED_WORKER_FIELDS)


@pytest.mark.parametrize("written", [SERVICE_JSON, WORKER_JSON], ids=["service", "worker"])
def test_a_heartbeat_survives_the_round_trip(written: bytes) -> None:
    heartbeat = decode_heartbeat(written)

    assert decode_heartbeat(encode_heartbeat(heartbeat)) == heartbeat


@pytest.mark.parametrize(
    "heartbeat",
    [decode_heartbeat(SERVICE_JSON), decode_heartbeat(WORKER_JSON)],
    ids=["service", "worker"],
)
def test_a_reader_of_the_shared_struct_finds_every_field_it_requires(
    heartbeat: ServiceHeartbeat | WorkerHeartbeat,
) -> None:
    written = as_dict(encode_heartbeat(heartbeat))

    assert SHARED_STRUCT_REQUIRED - set(written) == set()
    assert written["program"] == heartbeat.program


def test_fields_appended_later_default_when_an_older_writer_lacks_them() -> None:
    older = {k: v for k, v in as_dict(SERVICE_JSON).items() if k in SHARED_STRUCT_REQUIRED}

    heartbeat = decode_heartbeat(msgspec.json.encode(older))

    assert isinstance(heartbeat, ServiceHeartbeat)
    assert (heartbeat.ws_connections, heartbeat.db_pool, heartbeat.spans_dropped) == (0, {}, 0)


def test_a_worker_reports_each_partitions_backlog_by_its_name() -> None:
    older = decode_heartbeat(WORKER_JSON)
    assert isinstance(older, WorkerHeartbeat)
    partitioned = msgspec.structs.replace(
        older, partition_backlog={"0/3": 12, "1/3": 4500, "2/3": 0}
    )

    written = as_dict(encode_heartbeat(partitioned))

    assert written["partition_backlog"] == {"0/3": 12, "1/3": 4500, "2/3": 0}
    assert {k: v for k, v in written.items() if k != "partition_backlog"} == {
        k: v for k, v in as_dict(encode_heartbeat(older)).items() if k != "partition_backlog"
    }
    assert decode_heartbeat(encode_heartbeat(partitioned)) == partitioned
    # A heartbeat of a worker from before partitions reads as no partition measured.
    assert older.partition_backlog == {}


def test_a_worker_carries_the_databases_figures_and_an_older_one_none() -> None:
    older = decode_heartbeat(WORKER_JSON)
    assert isinstance(older, WorkerHeartbeat)
    stats = PostgresStats(
        measured_ms=1_700_000_000_000,
        connections={"active": 2, "idle": 5, "idle_in_transaction": 1},
        database_bytes=123_456_789,
        readings_partitions_ahead=7,
        readings_oldest_day_ms=1_699_920_000_000,
    )
    measured = msgspec.structs.replace(older, postgres=stats)

    written = as_dict(encode_heartbeat(measured))

    assert written["postgres"] == {
        "measured_ms": 1_700_000_000_000,
        "connections": {"active": 2, "idle": 5, "idle_in_transaction": 1},
        "database_bytes": 123_456_789,
        "readings_partitions_ahead": 7,
        "readings_oldest_day_ms": 1_699_920_000_000,
    }
    assert decode_heartbeat(encode_heartbeat(measured)) == measured
    # A worker from before these figures: none measured, not zeros.
    assert older.postgres is None


def test_a_heartbeat_of_an_unknown_program_is_refused() -> None:
    unknown = {**as_dict(SERVICE_JSON), "program": "pulsecal-other"}

    with pytest.raises(msgspec.DecodeError):
        decode_heartbeat(msgspec.json.encode(unknown))
