"""The sidecar's aggregation and exposition formats, without any server."""

import subprocess

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)

from shared.health import CheckResult
from shared.telemetry import (
    PROTOCOL_ERROR_KINDS,
    Kind,
    Record,
    TelemetryBatch,
    alert_record,
    analysis_record,
    dead_letter_record,
    protocol_error_record,
    rate_limited_record,
    ws_close_record,
    ws_message_record,
    ws_open_record,
)
from sidecar.aggregate import (
    DURATION_BUCKETS_S,
    OVERFLOW,
    WINDOW_SECONDS,
    Aggregator,
    percentile_from_buckets,
)
from sidecar.exposition import Family, Histogram, label_text, render, wants_openmetrics
from sidecar.metrics import business_families, health_families, protocol_error_family
from tests.support.sidecar import PROMTOOL_BIN, http_record, series_values

NOW_MS = 1_764_000_000_000


def batch(records: list[Record], *, boot: str = "boot-1", dropped: int = 0) -> TelemetryBatch:
    return TelemetryBatch(boot, NOW_MS, dropped, records)


def bucket_of(aggregator: Aggregator, key: tuple[str, str, int]) -> list[int]:
    return next(counts for k, counts, _ in aggregator.http_series() if k == key)


def test_requests_are_counted_per_method_route_and_status() -> None:
    aggregator = Aggregator(max_series=100)

    aggregator.add_batch(
        batch(
            [
                http_record(status=202),
                http_record(status=202),
                http_record(status=422, samples=0),
                http_record("unmatched", "GET", 404, samples=0),
            ]
        )
    )

    counts = {key: sum(c) for key, c, _ in aggregator.http_series()}
    assert counts == {
        ("/ingestion/ppg", "POST", 202): 2,
        ("/ingestion/ppg", "POST", 422): 1,
        ("unmatched", "GET", 404): 1,
    }
    assert aggregator.http_requests == 4
    assert aggregator.samples == {"http": 8, "ws": 0}
    assert aggregator.records == 4


def test_a_duration_on_a_bucket_bound_falls_in_that_bucket() -> None:
    aggregator = Aggregator(max_series=100)
    one_ms = DURATION_BUCKETS_S.index(0.001)

    aggregator.add_batch(batch([http_record(duration_us=1000), http_record(duration_us=1001)]))

    counts = bucket_of(aggregator, ("/ingestion/ppg", "POST", 202))
    assert counts[one_ms] == 1  # le="0.001" holds exactly 1 ms
    assert counts[one_ms + 1] == 1
    assert len(counts) == len(DURATION_BUCKETS_S) + 1


def test_durations_beyond_the_largest_bucket_land_in_inf_and_in_the_sum() -> None:
    aggregator = Aggregator(max_series=100)

    aggregator.add_batch(batch([http_record(duration_us=30_000_000)]))

    [(_, counts, sum_us)] = list(aggregator.http_series())
    assert counts[-1] == 1
    assert sum_us == 30_000_000


def test_series_beyond_the_cap_fold_into_the_overflow_route_and_are_counted() -> None:
    aggregator = Aggregator(max_series=10)

    aggregator.add_batch(batch([http_record(f"/r/{i}") for i in range(15)]))
    aggregator.add_batch(batch([http_record("/r/3"), http_record("/r/14")]))

    routes = {key[0] for key in aggregator.http}
    assert routes == {f"/r/{i}" for i in range(10)} | {OVERFLOW}
    assert sum(bucket_of(aggregator, (OVERFLOW, "POST", 202))) == 6
    assert aggregator.overflow == {"http_request_duration_seconds": 6}
    assert aggregator.http_requests == 17


def test_unknown_methods_and_statuses_are_bounded() -> None:
    aggregator = Aggregator(max_series=100)

    aggregator.add_batch(batch([http_record(method="BREW", status=999), http_record(status=-1)]))

    assert set(aggregator.http) == {("/ingestion/ppg", "OTHER", 0), ("/ingestion/ppg", "POST", 0)}


def test_websocket_events_are_counted_by_kind() -> None:
    aggregator = Aggregator(max_series=100)
    ws = "/ingestion/ws"

    aggregator.add_batch(
        batch(
            [
                ws_open_record(ws),
                ws_message_record(ws, 202, 50, 120, 4, None),
                ws_message_record(ws, 422, 50, 30, 0, None),
                ws_close_record(ws, 1001),
                ws_close_record(ws, 77),
                (max(Kind) + 1, ws, "GET", 0, 0, 0, 0, None),
            ]
        )
    )

    assert aggregator.ws_opens == 1
    assert aggregator.ws_messages == {202: 1, 422: 1}
    assert aggregator.ws_closes == {1001: 1, 0: 1}
    assert aggregator.samples["ws"] == 4
    assert aggregator.bytes_in["ws"] == 150
    assert aggregator.unknown_records == 1
    assert aggregator.http == {}


def test_dropped_records_are_the_sum_of_each_service_instance_s_latest_total() -> None:
    aggregator = Aggregator(max_series=100)

    aggregator.add_batch(batch([], boot="a", dropped=5))
    aggregator.add_batch(batch([], boot="a", dropped=7))
    aggregator.add_batch(batch([], boot="b", dropped=2))
    aggregator.add_batch(batch([], boot="a", dropped=7))  # a late entry repeats the total

    assert aggregator.dropped_total == 9


def test_dropped_totals_of_many_restarts_are_kept_while_the_state_stays_bounded() -> None:
    aggregator = Aggregator(max_series=100)

    for i in range(100):
        aggregator.add_batch(batch([], boot=f"boot-{i}", dropped=1))

    assert aggregator.dropped_total == 100
    assert len(aggregator.dropped_boots) <= 16


def test_rate_limit_verdicts_are_counted_by_policy_route_and_mode_and_survive_a_restart() -> None:
    aggregator = Aggregator(max_series=100)
    ppg, ws = "/ingestion/ppg", "/ingestion/ws"
    aggregator.add_batch(
        batch(
            [
                rate_limited_record(ppg, "ingest", 429),
                rate_limited_record(ppg, "ingest", 429),
                rate_limited_record(ws, "ingest", 429),
                rate_limited_record("unmatched", "api", 200),
            ]
        )
    )

    restored = Aggregator.from_bytes(aggregator.to_bytes(), max_series=100)
    text = render(business_families(restored, None), openmetrics=False).decode()

    assert restored.events == aggregator.events
    assert (
        'rate_limit_rejections_total{policy="ingest",route="/ingestion/ppg",mode="enforced"} 2'
        in text
    )
    assert (
        'rate_limit_rejections_total{policy="ingest",route="/ingestion/ws",mode="enforced"} 1'
        in text
    )
    assert 'rate_limit_rejections_total{policy="api",route="unmatched",mode="shadow"} 1' in text


def test_protocol_errors_are_counted_by_a_bounded_kind_and_survive_a_restart() -> None:
    aggregator = Aggregator(max_series=100)
    aggregator.add_batch(
        batch(
            [
                protocol_error_record("bad_header", 400),
                protocol_error_record("bad_header", 400),
                protocol_error_record("header_timeout", 408),
                protocol_error_record("a kind from a newer service", 400),
            ]
        )
    )

    restored = Aggregator.from_bytes(aggregator.to_bytes(), max_series=100)
    counts = {
        dict(labels)["kind"]: value
        for (name, labels), value in series_values(
            render([protocol_error_family(restored)], openmetrics=False).decode()
        ).items()
        if name == "pulsecal_http_protocol_errors_total"
    }

    assert counts == {
        **dict.fromkeys(PROTOCOL_ERROR_KINDS, 0),
        "bad_header": 2,
        "header_timeout": 1,
        "other": 1,
    }


def test_the_saved_state_restores_every_total_and_the_position() -> None:
    aggregator = Aggregator(max_series=100)
    aggregator.add_batch(batch([http_record(), http_record(status=503, duration_us=7000)]))
    aggregator.add_batch(batch([ws_message_record("/ingestion/ws", 202, 1, 2, 3, None)]))
    aggregator.last_id, aggregator.entries_read, aggregator.gap_entries = "17-3", 40, 2

    restored = Aggregator.from_bytes(aggregator.to_bytes(), max_series=100)

    assert list(restored.http_series()) == list(aggregator.http_series())
    assert (restored.last_id, restored.entries_read, restored.gap_entries) == ("17-3", 40, 2)
    assert restored.ws_messages == aggregator.ws_messages
    assert restored.samples == aggregator.samples
    assert restored.window == aggregator.window
    assert restored.records == aggregator.records == 3


def test_a_state_from_other_buckets_is_refused() -> None:
    with pytest.raises(ValueError, match="unreadable"):
        Aggregator.from_bytes(b"\x01garbage", max_series=10)


def test_the_window_gives_rate_errors_and_p95_per_ten_seconds() -> None:
    aggregator = Aggregator(max_series=100)
    fast = [http_record(duration_us=400)] * 90
    records = fast + [http_record(status=500, duration_us=40_000)] * 10

    aggregator.add_batch(batch(records))
    points = aggregator.window_points(NOW_MS / 1000 + WINDOW_SECONDS)

    last = points[-1]
    assert (last.requests, last.errors_5xx, last.errors_4xx) == (100, 10, 0)
    assert last.p95_s is not None
    assert 0.025 < last.p95_s <= 0.05  # the 95th of 100 is one of the slow ones
    assert all(p.requests == 0 for p in points[:-1])


def test_percentiles_interpolate_within_the_bucket() -> None:
    counts = [0] * (len(DURATION_BUCKETS_S) + 1)
    one_ms = DURATION_BUCKETS_S.index(0.001)
    counts[one_ms] = 100  # all between 0.5 ms and 1 ms

    assert percentile_from_buckets(counts, 0.5) == pytest.approx(0.00075)
    assert percentile_from_buckets([0] * len(counts), 0.95) is None


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", True),
        (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            True,
        ),
        ("application/openmetrics-text; q=0", False),
        ("text/plain", False),
        ("", False),
        ("*/*", False),
    ],
)
def test_openmetrics_is_chosen_only_when_asked_for(accept: str, expected: bool) -> None:
    assert wants_openmetrics(accept) is expected


def exposition_with_exemplar() -> list[Family]:
    aggregator = Aggregator(max_series=100)
    aggregator.add_batch(
        batch([http_record(duration_us=700, trace_id="4bf92f3577b34da6a3ce929d0e0e4736")])
    )
    [(key, counts, sum_us)] = list(aggregator.http_series())
    labels = label_text((("method", key[1]), ("route", key[0]), ("status", key[2])))
    return [
        Family(
            "http_request_duration_seconds",
            "histogram",
            "Duration.",
            histograms=[Histogram(labels, counts, sum_us / 1e6, aggregator.exemplars[key])],
            bounds=DURATION_BUCKETS_S,
        ),
        Family("http_requests", "counter", "Requests.", [(labels, sum(counts))]),
        Family("pulsecal_service", "info", "Info.", [('version="1"', 1)]),
    ]


def test_openmetrics_carries_the_trace_id_exemplar_on_the_observed_bucket() -> None:
    text = render(exposition_with_exemplar(), openmetrics=True).decode()

    families = {f.name: f for f in parse_openmetrics(text)}
    exemplars = [
        (s.labels["le"], s.exemplar)
        for s in families["http_request_duration_seconds"].samples
        if s.exemplar is not None
    ]
    assert text.endswith("# EOF\n")
    assert len(exemplars) == 1
    le, exemplar = exemplars[0]
    assert le == "0.001"
    assert exemplar.labels == {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert exemplar.value == pytest.approx(0.0007)
    assert families["http_requests"].type == "counter"
    assert families["pulsecal_service"].type == "info"


def test_the_text_format_has_no_exemplars_and_passes_promtool() -> None:
    text = render(exposition_with_exemplar(), openmetrics=False).decode()

    checked = subprocess.run(
        [PROMTOOL_BIN, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )

    assert "trace_id" not in text
    assert checked.returncode == 0, checked.stdout + checked.stderr
    values = series_values(text)
    assert values[("pulsecal_service_info", frozenset({("version", "1")}))] == 1


def test_label_values_are_escaped() -> None:
    route = 'a "quoted"\\route\nwith a newline'
    family = Family("http_requests", "counter", "Requests.", [(label_text([("route", route)]), 1)])

    text = render([family], openmetrics=False).decode()

    assert series_values(text) == {("http_requests_total", frozenset({("route", route)})): 1}


def test_health_checks_are_exported_as_up_gauges() -> None:
    checks = {
        "database": CheckResult(up=False, checked_at=1.0, duration_ms=12.5, error="refused"),
        "redis": CheckResult(up=True, checked_at=1.0, duration_ms=0.4),
    }

    text = render(health_families(checks), openmetrics=False).decode()

    assert 'pulsecal_health_check_up{check="database"} 0' in text.splitlines()
    assert 'pulsecal_health_check_up{check="redis"} 1' in text.splitlines()
    assert 'pulsecal_health_check_duration_seconds{check="database"} 0.0125' in text.splitlines()


def test_the_worker_s_records_become_the_business_counters() -> None:
    aggregator = Aggregator(max_series=100)
    aggregator.add_batch(
        batch(
            [
                alert_record("hr_high", "open"),
                alert_record("hr_high", "open"),
                alert_record("hr_high", "clear"),
                alert_record("silence", "open"),
                analysis_record(200, 900, 1, 1500),
                analysis_record(500, 900, 4, 1500),
                analysis_record(422, 900, 1, 1500),
                analysis_record(204, 0, 0, 0),
                dead_letter_record("undecodable"),
            ]
        )
    )

    lines = render(business_families(aggregator, None), openmetrics=False).decode().splitlines()

    assert 'alerts_created_total{rule="hr_high"} 2' in lines
    assert 'alerts_created_total{rule="silence"} 1' in lines
    assert 'alerts_created_total{rule="spo2_low"} 0' in lines
    assert 'pulsecal_alerts_cleared_total{rule="hr_high"} 1' in lines
    assert "ai_analysis_completed_total 1" in lines
    assert "ai_analysis_failed_total 2" in lines
    assert "pulsecal_ai_analysis_skipped_total 1" in lines
    assert 'pulsecal_dead_letters_total{reason="undecodable"} 1' in lines
