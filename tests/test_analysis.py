"""``pulsecal-analysis``: heart rate from PPG within 2 bpm, strict input, never a 500."""

import math
import random
import statistics
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.analysis import analyse, create_app
from service.sim import PpgSignal
from shared.settings import Settings

from .conftest import AiohttpClient

Client = TestClient[web.Request, web.Application]


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
async def ai(aiohttp_client: AiohttpClient, settings: Settings) -> Client:
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
    assert wrong_method.status == 405
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
