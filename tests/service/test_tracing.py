"""Tracing: spans reach a real OTLP/HTTP receiver, sampled requests only, sanitized."""

import gzip
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import INGEST
from shared.keys import Keys
from shared.readings import BATCHES_FIELD, RECEIVED_FIELD, decode_entries
from shared.settings import ServiceSettings
from shared.telemetry import Kind
from shared.tracing import Tracing, parse_traceparent, setup_tracing, traces_endpoint
from tests.support.env import AiohttpClient, Device
from tests.support.readings import stream_batches
from tests.support.telemetry import read_records
from tests.support.worker import eventually, stored_counts, worker_settings
from worker.app import create_app as create_worker_app

Client = TestClient[web.Request, web.Application]
URL = "/ingestion/ppg"
SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
CLOSED_COLLECTOR = "http://127.0.0.1:9/v1/traces"


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: what the collector would get, decoded."""

    url: str = ""
    spans: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            self.resources.append(resource)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "attributes": _attributes(span.attributes),
                            "links": [(lk.trace_id.hex(), lk.span_id.hex()) for lk in span.links],
                            "resource": resource,
                        }
                    )
        return web.Response(status=200, content_type="application/x-protobuf")


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(items: Any) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    found.url = str(server.make_url("/v1/traces"))
    yield found
    await server.close()


def traced_settings(settings: ServiceSettings, endpoint: str, **changes: Any) -> ServiceSettings:
    return replace(
        settings,
        tracing_enabled=True,
        otel_exporter_otlp_traces_endpoint=endpoint,
        otel_bsp_schedule_delay_ms=50,
        **changes,
    )


@pytest.fixture
def tracings() -> Iterator[list[Tracing]]:
    """Tracing set up by a test, shut down (instrumentation removed) after it."""
    made: list[Tracing] = []
    yield made
    for tracing in made:
        tracing.shutdown()


TracedService = Callable[..., Awaitable[tuple[Tracing, Client]]]


@pytest.fixture
def traced_service(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, tracings: list[Tracing]
) -> TracedService:
    """The service traced to ``endpoint``, ``changes`` applied to its tracing settings."""

    async def start(
        endpoint: str, *, app_settings: ServiceSettings | None = None, **changes: Any
    ) -> tuple[Tracing, Client]:
        tracing = setup_tracing(
            traced_settings(settings, endpoint, **changes), service_name="pulsecal-api"
        )
        tracings.append(tracing)
        client = await aiohttp_client(create_app(app_settings or settings, tracing=tracing))
        return tracing, client

    return start


async def flushed(tracing: Tracing) -> None:
    await tracing.flush()


async def test_a_sampled_request_is_traced_through_the_write_into_the_stream(
    traced_service: TracedService,
    settings: ServiceSettings,
    device: Device,
    receiver: Receiver,
    redis: Redis,
    keys: Keys,
) -> None:
    tracing, client = await traced_service(receiver.url)

    response = await client.post(
        URL, json=device.batch(1), headers={**device.headers, "traceparent": SAMPLED}
    )
    await flushed(tracing)

    assert response.status == 202
    server = next(s for s in receiver.spans if s["name"] == "POST /ingestion/ppg")
    write = next(s for s in receiver.spans if s["name"] == "EVALSHA readings")
    assert server["trace_id"] == "0af7651916cd43dd8448eb211c80319c"  # the caller's trace
    assert server["parent_span_id"] == "b7ad6b7169203331"
    assert write["parent_span_id"] == server["span_id"]
    assert response.headers["traceresponse"].split("-")[1] == server["trace_id"]
    # The stored entry names the write's span: a consumer continues the trace from it.
    [entry] = await stream_batches(redis, keys)
    assert entry.traceparent is not None
    stored = parse_traceparent(entry.traceparent.decode())
    assert stored == (int(write["trace_id"], 16), int(write["span_id"], 16), True)
    resource = server["resource"]
    assert resource["service.name"] == "pulsecal-api"
    assert resource["deployment.environment"] == settings.environment
    assert resource["service.instance.id"] == settings.pod
    assert resource["service.version"]
    # The sidecar's exemplars point at this trace.
    records = await read_records(redis, keys, settings.pod, flush=client.app[INGEST].telemetry)
    record = next(r for r in records if r[0] == Kind.HTTP)
    assert record[7] == server["trace_id"]


async def test_spans_carry_no_tokens_headers_or_payload_values(
    traced_service: TracedService,
    device: Device,
    receiver: Receiver,
) -> None:
    tracing, client = await traced_service(receiver.url, otel_traces_sampler="always_on")
    batch = device.batch(1, ppg=[123.456789] * 8)

    await client.post(URL, json=batch, headers=device.headers)
    await client.post(URL, json=batch, headers={"Authorization": "Bearer pct_not-a-real-token"})
    await client.get(
        "/nowhere?secret=hunter2", headers={"Authorization": device.headers["Authorization"]}
    )
    await flushed(tracing)

    assert len(receiver.spans) >= 4
    exported = msgspec.json.encode(receiver.spans).decode()
    token = device.headers["Authorization"].removeprefix("Bearer ")
    for secret in (token, "pct_not-a-real-token", "hunter2", "123.456789", device.device_id):
        assert secret not in exported
    names = {s["name"] for s in receiver.spans}
    assert "GET /{path}" in names  # route templates, never raw paths
    assert all(
        not key.startswith("http.request.header") for s in receiver.spans for key in s["attributes"]
    )


async def test_an_unsampled_request_makes_no_span_and_no_trace_in_the_stream(
    traced_service: TracedService,
    device: Device,
    receiver: Receiver,
    redis: Redis,
    keys: Keys,
) -> None:
    tracing, client = await traced_service(receiver.url, otel_traces_sampler_arg=1.0)

    response = await client.post(
        URL, json=device.batch(1), headers={**device.headers, "traceparent": UNSAMPLED}
    )
    await flushed(tracing)

    assert response.status == 202
    assert "traceresponse" not in response.headers
    # Only the background work (token refresh, checks) is traced, at its own ratio.
    assert not [s for s in receiver.spans if "ingestion" in s["name"] or "readings" in s["name"]]
    [(_, fields)] = await redis.xrange(keys.readings)
    [entry] = decode_entries(fields)
    assert entry.traceparent is None
    assert set(fields) == {RECEIVED_FIELD, BATCHES_FIELD}  # no trace field at all


async def test_the_sampling_ratio_is_honoured(
    traced_service: TracedService,
    settings: ServiceSettings,
    device: Device,
    redis: Redis,
    keys: Keys,
) -> None:
    # A closed port: nothing needs to arrive for the decision to be counted. Records stay
    # in the buffer until the test writes them out, all in one entry.
    _, client = await traced_service(
        CLOSED_COLLECTOR,
        app_settings=replace(settings, telemetry_flush_interval=3600),
        otel_traces_sampler_arg=0.25,
        otel_exporter_otlp_timeout_ms=200,
    )
    requests = 400

    for seq in range(requests):
        await client.post(URL, json=device.batch(seq), headers=device.headers)
    telemetry = await read_records(redis, keys, settings.pod, flush=client.app[INGEST].telemetry)
    records = [r for r in telemetry if r[0] == Kind.HTTP]
    sampled = sum(1 for r in records if r[7] is not None)

    assert len(records) == requests
    # Binomial(400, 0.25): mean 100, standard deviation 8.7; five of them either side.
    assert 56 <= sampled <= 144


async def test_an_unreachable_collector_costs_dropped_spans_not_requests(
    traced_service: TracedService, device: Device
) -> None:
    tracing, client = await traced_service(
        CLOSED_COLLECTOR,
        otel_traces_sampler="always_on",
        otel_exporter_otlp_timeout_ms=200,
        otel_bsp_max_queue_size=16,
    )

    statuses = [
        (await client.post(URL, json=device.batch(seq), headers=device.headers)).status
        for seq in range(100)
    ]
    await flushed(tracing)

    assert statuses == [202] * 100
    assert tracing.dropped > 0  # counted, not raised


async def test_each_sampled_websocket_message_is_a_span_of_its_own(
    traced_service: TracedService,
    device: Device,
    receiver: Receiver,
) -> None:
    tracing, client = await traced_service(receiver.url, otel_traces_sampler="always_on")

    async with client.ws_connect(
        "/ingestion/ws", headers={**device.headers, "traceparent": SAMPLED}
    ) as ws:
        for seq in (1, 2):
            await ws.send_json(device.batch(seq))
            assert await ws.receive_json() == {"ack": seq}
    await flushed(tracing)

    messages = [s for s in receiver.spans if s["name"] == "WS /ingestion/ws"]
    assert len(messages) == 2
    assert len({s["trace_id"] for s in messages}) == 2
    assert all(s["links"] == [(SAMPLED.split("-")[1], SAMPLED.split("-")[2])] for s in messages)
    writes = [s for s in receiver.spans if s["name"] == "EVALSHA readings"]
    assert {w["parent_span_id"] for w in writes} == {m["span_id"] for m in messages}


def test_a_legacy_jaeger_endpoint_is_pointed_at_the_otlp_port(settings: ServiceSettings) -> None:
    legacy = replace(settings, jaeger_endpoint="http://jaeger:14268/api/traces")
    otlp = replace(settings, jaeger_endpoint="http://jaeger:4318/v1/traces")
    explicit = replace(
        legacy, otel_exporter_otlp_endpoint="http://collector:4318/", jaeger_endpoint=None
    )

    assert traces_endpoint(legacy) == "http://jaeger:4318/v1/traces"
    assert traces_endpoint(otlp) == "http://jaeger:4318/v1/traces"
    assert traces_endpoint(explicit) == "http://collector:4318/v1/traces"


def test_tracing_off_decides_nothing(settings: ServiceSettings) -> None:
    tracing = setup_tracing(settings, service_name="pulsecal-api")

    assert not tracing.enabled
    assert tracing.decide(SAMPLED) is False


async def test_the_worker_continues_the_trace_across_the_readings_stream(
    traced_service: TracedService,
    aiohttp_client: AiohttpClient,
    settings: ServiceSettings,
    device: Device,
    receiver: Receiver,
) -> None:
    tracing, service = await traced_service(receiver.url)
    response = await service.post(
        URL, json=device.batch(1), headers={**device.headers, "traceparent": SAMPLED}
    )
    await aiohttp_client(create_worker_app(worker_settings(settings), tracing=tracing))

    await eventually(lambda: _stored(settings.database_url, device.device_id), within=10)
    await flushed(tracing)

    assert response.status == 202
    write = next(s for s in receiver.spans if s["name"] == "EVALSHA readings")
    persist = next(s for s in receiver.spans if s["name"] == "persist readings")
    assert persist["trace_id"] == write["trace_id"] == SAMPLED.split("-")[1]
    assert persist["parent_span_id"] == write["span_id"]
    assert persist["attributes"]["messaging.destination.name"] == "readings"


async def _stored(database_url: str, device_id: str) -> bool:
    return bool(await stored_counts(database_url, [device_id]))
