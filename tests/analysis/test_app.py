"""``pulsecal-analysis``: heart rate from PPG within 2 bpm, strict input, never a 500."""

import dataclasses
import io
import math
import os
import random
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import ClientSession, ClientTimeout, web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from analysis.app import analyse, create_app, running
from devtools.sim import PpgSignal
from shared.httpserver import SERVER
from shared.settings import AnalysisSettings
from tests.support.env import AiohttpClient
from tests.support.procs import _SETTINGS_ENV, _Process, free_port
from tests.support.rawhttp import converse, parse_answer

Client = TestClient[web.Request, web.Application]
ANALYSIS_BIN = Path(sys.executable).with_name("pulsecal-analysis")


def synthetic_ppg(
    bpm: float, *, rate_hz: float = 50.0, seconds: float = 30.0, seed: int = 0
) -> list[float]:
    """Pulses at ``bpm`` with beat-to-beat jitter, a diastolic wave, breathing and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    beats = np.cumsum(60 / bpm * (1 + rng.normal(0, 0.02, int(seconds * bpm / 60) + 5)))
    beats -= rng.uniform(0, 60 / bpm)
    signal = np.zeros_like(t)
    for beat in beats:
        signal += np.exp(-0.5 * ((t - beat) / 0.06) ** 2)
        signal += 0.4 * np.exp(-0.5 * ((t - beat - 0.3 * 60 / bpm) / 0.1) ** 2)
    signal += 0.3 * np.sin(2 * math.pi * 0.25 * t) + rng.normal(0, 0.05, len(t))
    return [float(v) for v in 120_000 + 1500 * signal]


@pytest.mark.parametrize("bpm", [42, 60, 72, 95, 130, 170])
@pytest.mark.parametrize("rate_hz", [25.0, 50.0, 128.0])
def test_heart_rate_is_recovered_within_2_bpm(bpm: int, rate_hz: float) -> None:
    estimate = analyse(synthetic_ppg(bpm, rate_hz=rate_hz, seed=bpm), rate_hz)

    assert abs(estimate.heart_rate_bpm - bpm) < 2
    assert estimate.hrv_rmssd_ms is not None
    assert estimate.quality > 0.9


@pytest.mark.parametrize("device", [f"sim-{i:03d}" for i in range(1, 9)])
def test_the_simulators_heart_rate_is_recovered_within_2_bpm(device: str) -> None:
    signal = PpgSignal(rate_hz=50.0, character=random.Random(device), noise=random.Random(3))
    samples: list[int] = []
    reported: list[float] = []
    for _ in range(30):
        batch, hr, _ = signal.next_samples(50)
        samples += batch
        reported.append(hr)

    estimate = analyse(samples, 50.0)

    assert abs(estimate.heart_rate_bpm - statistics.fmean(reported)) < 2


@pytest.fixture
async def ai(aiohttp_client: AiohttpClient, settings: AnalysisSettings) -> Client:
    return await aiohttp_client(create_app(settings))


async def test_analyze_answers_the_estimate(ai: Client) -> None:
    response = await ai.post(
        "/analyze", json={"rate_hz": 50, "ppg": synthetic_ppg(66), "device_id": "dev-1"}
    )
    body = await response.json()

    assert response.status == 200
    assert abs(body["heart_rate_bpm"] - 66) < 2
    assert set(body) == {
        "heart_rate_bpm",
        "hrv_rmssd_ms",
        "hrv_sdnn_ms",
        "beats",
        "quality",
        "duration_s",
    }


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, None),
        (b'{"rate_hz": 50}', 422, "ppg"),
        (b'{"rate_hz": 5, "ppg": [1, 2, 3]}', 422, "rate_hz"),
        (b'{"rate_hz": 50, "ppg": [1, 2, "x"]}', 422, "ppg[2]"),
        (b'{"rate_hz": 50, "ppg": [1, 2, 1e12]}', 422, "ppg[2]"),
        (b'{"rate_hz": 50, "ppg": [1, 2], "extra": 1}', 422, "extra"),
        (b'{"rate_hz": 50, "ppg": [1, 2, 3]}', 422, "ppg"),  # too short
        (msgspec.json.encode({"rate_hz": 50, "ppg": [7.0] * 1500}), 422, "ppg"),  # flat
        (b"[]", 422, "$"),
    ],
)
async def test_bad_input_is_refused_in_the_error_shape(
    ai: Client, body: bytes, status: int, field: str | None
) -> None:
    response = await ai.post("/analyze", data=body, headers={"Content-Type": "application/json"})
    error = (await response.json())["error"]

    assert response.status == status
    assert set(error) == {"code", "message", "details"}
    assert (error["details"] or {}).get("field") == field


async def test_wrong_type_unknown_path_and_method_are_json_errors(ai: Client) -> None:
    wrong_type = await ai.post(
        "/analyze", data=b"rate_hz=50", headers={"Content-Type": "text/plain"}
    )
    unknown = await ai.get("/nope")
    wrong_method = await ai.get("/analyze")

    assert (wrong_type.status, (await wrong_type.json())["error"]["code"]) == (
        415,
        "unsupported_media_type",
    )
    assert (unknown.status, (await unknown.json())["error"]["code"]) == (404, "not_found")
    assert (wrong_method.status, wrong_method.headers["Allow"]) == (405, "POST")
    assert (await wrong_method.json())["error"]["code"] == "method_not_allowed"


async def test_health_answers(ai: Client) -> None:
    response = await ai.get("/health")

    assert response.status == 200
    assert (await response.json())["status"] == "ok"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(
        _json,
        st.fixed_dictionaries(
            {
                "rate_hz": st.floats(allow_nan=False, allow_infinity=False),
                "ppg": st.lists(st.floats(-1e9, 1e9), max_size=400),
            }
        ),
    )
)
async def test_no_input_makes_it_answer_500(ai: Client, body: Any) -> None:
    response = await ai.post(
        "/analyze", data=msgspec.json.encode(body), headers={"Content-Type": "application/json"}
    )

    assert response.status in (200, 400, 422)


# --- probes, headers and refusals: the rules of the service (docs/health.md) -------------

OPERATOR = "operator-token-for-tests"
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR}"}
PROBES = ("/health", "/health/liveness", "/health/readiness", "/health/startup")
# In every refused request, so an answer that quotes the request would show it.
MARKER = b"Zq7echo"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def operated(settings: AnalysisSettings) -> AnalysisSettings:
    """A production analysis service whose operator holds ``OPERATOR``."""
    return dataclasses.replace(settings, environment="production", health_detail_token=OPERATOR)


@pytest.fixture
async def served(operated: AnalysisSettings) -> AsyncIterator[int]:
    """The analysis service on a free port as ``pulsecal-analysis`` serves it: its port."""
    async with running(dataclasses.replace(operated, port=0), host="127.0.0.1") as served:
        yield served.port


async def get(port: int, path: str, **headers: str) -> tuple[int, Any, dict[str, str]]:
    async with (
        ClientSession(timeout=ClientTimeout(total=10)) as session,
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None), dict(response.headers)


async def test_each_probe_answers_anyone_its_status_alone_and_the_operator_its_details(
    served: int,
) -> None:
    for path in PROBES:
        anonymous = await get(served, path)
        wrong = await get(served, path, Authorization="Bearer not-the-token")
        as_json = await get(served, path, Accept="application/health+json")
        operator = await get(served, path, **AS_OPERATOR)
        operator_json = await get(served, path, Accept="application/health+json", **AS_OPERATOR)

        assert anonymous[:2] == (200, {"status": "ok"}), path
        assert wrong[:2] == (200, {"status": "ok"}), path
        assert as_json[:2] == (200, {"status": "pass"}), path
        assert as_json[2]["Content-Type"] == "application/health+json", path
        assert operator[0] == 200, path
        assert operator[1]["details"]["process"]["pid"] == os.getpid(), path
        assert operator_json[1]["serviceId"] == "pulsecal-analysis", path


async def test_the_metrics_token_sees_the_details_when_no_detail_token_is_set(
    aiohttp_client: AiohttpClient, settings: AnalysisSettings
) -> None:
    scrape = "scrape-token"
    ai = await aiohttp_client(
        create_app(dataclasses.replace(settings, environment="production", metrics_token=scrape))
    )

    anonymous = await (await ai.get("/health")).json()
    operator = await (await ai.get("/health", headers={"Authorization": f"Bearer {scrape}"})).json()

    assert anonymous == {"status": "ok"}
    assert operator["details"]["process"]["uptime_s"] >= 0


@pytest.mark.parametrize(("environment", "details"), [("development", True), ("production", False)])
async def test_without_any_token_only_development_shows_the_details(
    aiohttp_client: AiohttpClient, settings: AnalysisSettings, environment: str, details: bool
) -> None:
    untokened = dataclasses.replace(
        settings, environment=environment, metrics_token=None, health_detail_token=None
    )
    ai = await aiohttp_client(create_app(untokened))

    body = await (await ai.get("/health")).json()

    assert ("details" in body) is details


async def test_no_answer_names_the_server_s_versions(served: int) -> None:
    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        answers = [
            await session.request(method, f"http://127.0.0.1:{served}{path}", **kwargs)
            for method, path, kwargs in (
                ("GET", "/health", {}),
                ("HEAD", "/health/liveness", {}),
                ("POST", "/analyze", {"json": {"rate_hz": 50, "ppg": synthetic_ppg(70)}}),
                ("POST", "/analyze", {"json": {"rate_hz": 50}}),
                (
                    "POST",
                    "/analyze",
                    {"data": io.BytesIO(b"x" * (17 << 20)), "headers": JSON},
                ),
                ("GET", "/analyze", {}),
                ("GET", "/nowhere", {}),
            )
        ]
        for answer in answers:
            answer.release()

    assert [a.status for a in answers] == [200, 200, 200, 422, 413, 405, 404]
    assert [a.headers.get("Server") for a in answers] == [SERVER] * len(answers)


REFUSED = {
    "garbage request line": (MARKER + b"\r\n\r\n", 400, "bad_request_line"),
    "HTTP/2.0 request line": (
        b"GET /" + MARKER + b" HTTP/2.0\r\nHost: a\r\n\r\n",
        400,
        "bad_version",
    ),
    "no Host in HTTP/1.1": (b"GET /health?" + MARKER + b" HTTP/1.1\r\n\r\n", 400, "bad_header"),
    "CONNECT": (
        b"CONNECT " + MARKER + b":443 HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "bad_request_target",
    ),
    "Content-Encoding br": (
        b"POST /analyze HTTP/1.1\r\nHost: a\r\nContent-Encoding: br\r\nContent-Length: 7\r\n\r\n"
        + MARKER,
        415,
        "unsupported_content_encoding",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_a_request_the_parser_refuses_is_a_json_4xx_quoting_nothing(
    served: int, name: str
) -> None:
    request, status, kind = REFUSED[name]

    answer = await converse(served, [request])

    assert answer.status == status, answer.raw[:300]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["server"] == SERVER
    assert MARKER not in answer.raw
    assert answer.json()["error"]["details"] == {"kind": kind}


@pytest.mark.parametrize(
    ("method", "path"),
    [(b"POST", b"/analyze"), (b"GET", b"/health"), (b"GET", b"/nowhere"), (b"GET", b"/analyze")],
)
async def test_an_expectation_other_than_100_continue_is_a_json_417_on_any_path(
    served: int, method: bytes, path: bytes
) -> None:
    request = method + b" " + path + b" HTTP/1.1\r\nHost: a\r\nExpect: 200-" + MARKER + b"\r\n\r\n"

    answer = await converse(served, [request])

    assert answer.status == 417, answer.raw[:300]
    assert answer.headers["server"] == SERVER
    assert MARKER not in answer.raw
    assert answer.json()["error"]["details"] == {"kind": "unsupported_expectation"}


async def test_expect_100_continue_is_met_and_the_window_analysed(served: int) -> None:
    body = msgspec.json.encode({"rate_hz": 50, "ppg": synthetic_ppg(80)})
    head = (
        b"POST /analyze HTTP/1.1\r\nHost: a\r\nConnection: close\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )

    # The body only once the server has said to go on, as a client that expects does.
    answer = await converse(served, [head, 0.3, body])

    assert answer.raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), answer.raw[:300]
    final = parse_answer(answer.raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert final.status == 200
    assert abs(final.json()["heart_rate_bpm"] - 80) < 2


async def test_pulsecal_analysis_serves_the_rules_as_a_process(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in _SETTINGS_ENV},
        "PORT": str(port),
        "LOG_DIR": str(tmp_path),
        "ENVIRONMENT": "production",
        "HEALTH_DETAIL_TOKEN": OPERATOR,
    }
    process = _Process([str(ANALYSIS_BIN)], env=env, log_dir=tmp_path)
    process.start()
    try:
        await process.wait_answering(f"http://127.0.0.1:{port}/health")
        anonymous = await get(port, "/health")
        operator = await get(port, "/health", **AS_OPERATOR)
        refused = await converse(port, [MARKER + b"\r\n\r\n"])
    finally:
        process.kill()

    assert anonymous[:2] == (200, {"status": "ok"})
    assert anonymous[2]["Server"] == SERVER
    assert operator[1]["details"]["process"]["pid"] > 0
    assert (refused.status, refused.headers["server"]) == (400, SERVER)
    assert refused.json()["error"]["details"] == {"kind": "bad_request_line"}
