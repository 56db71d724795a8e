"""The published contract: docs/api/openapi.json is what service/openapi.py generates, the
service serves it, it documents every route, and its batch schema is exactly the decoder's."""

import dataclasses
import functools
import json
import uuid
from typing import Any

import jsonschema_rs
import msgspec
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.openapi import OPENAPI_ROUTE, build_document, document_bytes, ecma_patterns
from shared.settings import ServiceSettings
from shared.wire import BatchError, PpgBatch, decode_batch
from tests.support.env import AiohttpClient, Device
from tests.support.paths import ROOT_DIR

Client = TestClient[web.Request, web.Application]
COMMITTED = ROOT_DIR / "docs" / "api" / "openapi.json"
REGENERATE = "python -m service.openapi > docs/api/openapi.json"
VALID_BATCH: dict[str, Any] = {
    "device_id": "dev-1",
    "seq": 7,
    "ts": 1_764_000_000_000,
    "rate_hz": 50,
    "ppg": [0.5, 0.6],
    "hr": 72,
    "spo2": 98,
}


@functools.cache
def batch_validator() -> jsonschema_rs.Validator:
    """The document's batch schema, as a client in any language reads it (ECMA regexes)."""
    document = build_document()
    schema = {"$ref": "#/components/schemas/PpgBatch", "components": document["components"]}
    return jsonschema_rs.validator_for(schema)


def decoder_accepts(body: bytes) -> bool:
    try:
        decode_batch(body)
    except BatchError:
        return False
    return True


def test_committed_document_is_the_generated_one() -> None:
    assert COMMITTED.read_bytes() == document_bytes(), (
        f"docs/api/openapi.json is out of date: run `{REGENERATE}` and commit it"
    )


def test_document_is_valid_openapi_3_1() -> None:
    document = build_document()

    schema = schemathesis.openapi.from_dict(document)
    schema.validate()

    assert document["openapi"] == "3.1.0"


def test_every_reference_in_the_document_resolves() -> None:
    document = build_document()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    unresolved = []
    for ref in refs:
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        if target is None:
            unresolved.append(ref)

    assert refs
    assert unresolved == []


def test_every_route_of_the_service_is_documented_and_no_other(settings: ServiceSettings) -> None:
    app = create_app(settings)
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method not in ("HEAD", "*")
    }
    documented = {
        (method.upper(), path)
        for path, operations in build_document()["paths"].items()
        for method in operations
    }

    assert routes == documented


async def test_service_serves_the_document_without_a_token(client: Client) -> None:
    response = await client.get(OPENAPI_ROUTE)

    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.read() == document_bytes()


async def test_document_describes_an_acknowledged_batch(client: Client, device: Device) -> None:
    """The 202 body the hot path writes from bytes is the document's ``IngestAck``."""
    response = await client.post("/ingestion/ppg", json=device.batch(3), headers=device.headers)
    document = build_document()
    schema = {"$ref": "#/components/schemas/IngestAck", "components": document["components"]}

    assert response.status == 202
    assert jsonschema_rs.validator_for(schema).is_valid(await response.json())


HEALTH_TOKEN = "health-" + uuid.uuid4().hex
PROBES = ["/health", "/health/liveness", "/health/readiness", "/health/startup"]


@pytest.mark.parametrize("accept", ["application/json", "application/health+json"])
@pytest.mark.parametrize("path", PROBES)
async def test_document_gives_each_probe_answer_the_shape_of_who_asked(
    aiohttp_client: AiohttpClient, settings: ServiceSettings, device: Device, path: str, accept: str
) -> None:
    """Anyone gets the status alone, the operator the report: the document's ``oneOf``
    names the first shape for one and the second for the other."""
    app = create_app(dataclasses.replace(settings, health_detail_token=HEALTH_TOKEN))
    client = await aiohttp_client(app)
    anonymous = await client.get(path, headers={"Accept": accept})
    operator = await client.get(
        path, headers={"Accept": accept, "Authorization": f"Bearer {HEALTH_TOKEN}"}
    )
    document = build_document()
    components = document["components"]

    def shapes(status: int) -> list[jsonschema_rs.Validator]:
        content = document["paths"][path]["get"]["responses"][str(status)]["content"]
        return [
            jsonschema_rs.validator_for({**shape, "components": components})
            for shape in content[accept]["schema"]["oneOf"]
        ]

    status_only, report = shapes(anonymous.status)
    anonymous_body = await anonymous.json(content_type=None)
    assert anonymous.content_type == accept
    assert (status_only.is_valid(anonymous_body), report.is_valid(anonymous_body)) == (True, False)
    status_only, report = shapes(operator.status)
    operator_body = await operator.json(content_type=None)
    assert operator.content_type == accept
    assert (status_only.is_valid(operator_body), report.is_valid(operator_body)) == (False, True)


def test_batch_schema_is_the_decoders_type_with_portable_patterns() -> None:
    _, components = msgspec.json.schema_components([PpgBatch])

    batch = build_document()["components"]["schemas"]["PpgBatch"]

    assert batch == ecma_patterns(components["PpgBatch"])


@pytest.mark.parametrize(
    ("python", "ecma"),
    [
        (r"^[a-z]{1,3}\Z", r"^[a-z]{1,3}$"),
        (r"\A[a-z]$", r"^[a-z]$"),
        (r"a\\Z", r"a\\Z"),  # an escaped backslash, then Z: no anchor
        (r"a\\\Z", r"a\\$"),
    ],
)
def test_python_anchors_are_written_as_json_schema_anchors(python: str, ecma: str) -> None:
    assert ecma_patterns({"pattern": python}) == {"pattern": ecma}


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="valid"),
        pytest.param({"device_id": "dev-1\n"}, id="device-id-trailing-newline"),
        pytest.param({"device_id": "-dev"}, id="device-id-leading-dash"),
        pytest.param({"device_id": "d" * 65}, id="device-id-too-long"),
        pytest.param({"seq": 7.0}, id="seq-integral-float"),
        pytest.param({"ts": 1_764_000_000_000.0}, id="ts-integral-float"),
        pytest.param({"seq": -1}, id="seq-negative"),
        pytest.param({"seq": 2**53}, id="seq-too-large"),
        pytest.param({"rate_hz": 0}, id="rate-zero"),
        pytest.param({"ppg": []}, id="ppg-empty"),
        pytest.param({"hr": None, "spo2": None}, id="vitals-null"),
        pytest.param({"extra": 1}, id="unknown-field"),
    ],
)
def test_decoder_and_document_agree_on_a_batch(overrides: dict[str, Any]) -> None:
    batch = {**VALID_BATCH, **overrides}

    assert decoder_accepts(json.dumps(batch).encode()) == batch_validator().is_valid(batch)


_numbers = (
    st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
    | st.sampled_from([0, 1, -1, 400, 401, 100, 101, 10_000, 10_001, 2**53 - 1, 2**53])
    # Around the smallest value a Postgres real keeps (shared/wire.py, REAL_UNDERFLOW).
    | st.sampled_from([2.0**-150, 2.0**-149, 1e-46, 5e-324, -(2.0**-150), 1e-45])
)
_values = (
    _numbers
    | st.none()
    | st.booleans()
    | st.text(alphabet="aZ09._:-\n /é", max_size=70)
    | st.lists(_numbers, max_size=3)
)


@settings(max_examples=300, deadline=None)
@given(
    replaced=st.dictionaries(st.sampled_from([*VALID_BATCH, "extra"]), _values, max_size=3),
    dropped=st.sets(st.sampled_from(list(VALID_BATCH)), max_size=2),
)
def test_decoder_accepts_exactly_the_batches_the_document_allows(
    replaced: dict[str, Any], dropped: set[str]
) -> None:
    # Integral floats in integer fields are left to the example above: one finding, one test.
    batch = {k: v for k, v in {**VALID_BATCH, **replaced}.items() if k not in dropped}

    assert decoder_accepts(json.dumps(batch).encode()) == batch_validator().is_valid(batch), batch
