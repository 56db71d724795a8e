"""``pulsecal-analysis``: the reference AI service, heart rate and HRV from a PPG window.

``POST /analyze`` takes ``{"rate_hz": number, "ppg": [number, ...], "device_id"?: str,
"start_ms"?: int}`` and answers ``{"heart_rate_bpm", "hrv_rmssd_ms", "hrv_sdnn_ms",
"beats", "quality", "duration_s"}``. Method: the window is band-passed to 0.5-4 Hz (30-240
beats per minute) by FFT; the strongest frequency in that band sets the shortest plausible
beat interval; pulse peaks are the local maxima at least 0.6 of that interval apart (taller
ones first), located to a fraction of a sample by a parabola through each peak and its
neighbours. Heart rate is 60 / mean beat interval; the HRV figures (RMSSD, SDNN) use the
intervals within 30 % of the median (others are taken as missed or extra beats), and
``quality`` is their share.

Input is validated strictly (msgspec): malformed JSON 400, not JSON 415, too large 413, a
bad field 422 (its path in ``details.field``), a window with no detectable pulse 422; never
a 500 for bad input. Listens on ``PORT`` (default 8000), served as the service is
(``shared/httpserver.py``): a request refused below the routes is a JSON 4xx, every answer
says ``Server: pulsecal``, an ``Expect`` other than ``100-continue`` is a JSON 417. The
probes answer anyone their status, the operator their details (``shared/access.py``).
"""

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np
from aiohttp import web
from aiohttp.typedefs import Handler

from shared.appkeys import PROBES
from shared.cli import parse_program_args
from shared.errors import error_response, fault_response
from shared.httpserver import expect_continue, server_header
from shared.logs import setup_logging
from shared.runtime import serving
from shared.runtime.probes import Probes
from shared.runtime.serving import Program, Running
from shared.settings import AnalysisSettings, load_settings_or_exit

__all__ = ("ANALYSIS", "AnalysisError", "Estimate", "analyse", "create_app", "main", "running")

MAX_SAMPLES = 600_000  # ten minutes at 1 kHz
MIN_SECONDS = 5.0
BAND_HZ = (0.5, 4.0)
_MAX_BODY = 16 * 1024 * 1024
_SERVICE_ID = "pulsecal-analysis"

PROGRAM = "pulsecal-analysis"
DESCRIPTION = """
The reference AI service: POST /analyze takes a PPG window ({"rate_hz", "ppg": [...]}) and
answers its heart rate and heart-rate variability (RMSSD, SDNN) with the beats found and a
quality figure; /health and the probes answer too. The worker calls it at AI_SERVICE_URL.
It serves until SIGTERM or SIGINT.
"""

Sample = Annotated[float, msgspec.Meta(ge=-1e9, le=1e9)]


class AnalyzeRequest(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    rate_hz: Annotated[float, msgspec.Meta(ge=10, le=10_000)]
    ppg: Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    device_id: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    start_ms: int | None = None


_decoder = msgspec.json.Decoder(AnalyzeRequest)
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED_FIELD = re.compile(r"field `(?P<path>[^`]+)`")


class AnalysisError(ValueError):
    """The window cannot be analysed (too short, no pulse); the message says why."""


@dataclass(frozen=True, slots=True)
class Estimate:
    heart_rate_bpm: float
    hrv_rmssd_ms: float | None
    hrv_sdnn_ms: float | None
    beats: int
    quality: float
    duration_s: float


def _band_passed(x: np.ndarray, rate_hz: float) -> tuple[np.ndarray, float]:
    """The signal restricted to the pulse band, and the band's strongest frequency (Hz)."""
    n = len(x)
    spectrum = np.fft.rfft(x - x.mean())
    freqs = np.fft.rfftfreq(n, 1.0 / rate_hz)
    outside = (freqs < BAND_HZ[0]) | (freqs > BAND_HZ[1])
    spectrum[outside] = 0
    power = np.abs(spectrum) ** 2
    if not np.any(power > 0):
        raise AnalysisError("no pulse found: the signal is flat in the 30-240 bpm band")
    peak = int(np.argmax(power))
    dominant = float(freqs[peak])
    # A pulse rich in harmonics can make the second one the strongest: prefer the
    # fundamental when it carries a fair share of the power.
    half = int(np.argmin(np.abs(freqs - dominant / 2)))
    if freqs[half] >= BAND_HZ[0] and power[max(half - 1, 0) : half + 2].max() > 0.3 * power[peak]:
        dominant = float(freqs[half])
    return np.fft.irfft(spectrum, n), dominant


def _peaks(y: np.ndarray, min_distance: int) -> np.ndarray:
    """Local maxima above zero, at least ``min_distance`` samples apart, taller ones first."""
    middle = y[1:-1]
    candidates = np.flatnonzero((middle > y[:-2]) & (middle >= y[2:]) & (middle > 0)) + 1
    if min_distance <= 1 or len(candidates) < 2:
        return candidates
    taken = np.zeros(len(y), dtype=bool)
    blocked = np.zeros(len(y) + 2 * min_distance, dtype=bool)
    for index in candidates[np.argsort(-y[candidates], kind="stable")]:
        if blocked[index + min_distance]:
            continue
        taken[index] = True
        blocked[index + 1 : index + 2 * min_distance] = True
    return np.flatnonzero(taken)


def analyse(ppg: Sequence[float] | np.ndarray, rate_hz: float) -> Estimate:
    x = np.asarray(ppg, dtype=np.float64)
    duration = len(x) / rate_hz
    if duration < MIN_SECONDS:
        raise AnalysisError(f"window too short: {duration:.1f} s, need {MIN_SECONDS:g} s")
    y, dominant = _band_passed(x, rate_hz)
    min_distance = int(0.6 * rate_hz / dominant)
    peaks = _peaks(y, min_distance)
    peaks = peaks[(peaks > 0) & (peaks < len(y) - 1)]
    if len(peaks) < 3:
        raise AnalysisError(f"no pulse found: {len(peaks)} beats in {duration:.1f} s")
    left, centre, right = y[peaks - 1], y[peaks], y[peaks + 1]
    curvature = left - 2 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
    times = (peaks + np.clip(offset, -0.5, 0.5)) / rate_hz
    intervals = np.diff(times)
    median = float(np.median(intervals))
    good = (intervals > 0.7 * median) & (intervals < 1.3 * median)
    kept = intervals[good]
    heart_rate = 60.0 / float(kept.mean())
    successive = np.diff(intervals)[good[1:] & good[:-1]]
    rmssd = float(np.sqrt(np.mean(successive**2)) * 1000) if len(successive) else None
    sdnn = float(kept.std() * 1000) if len(kept) > 1 else None
    return Estimate(
        heart_rate_bpm=round(heart_rate, 2),
        hrv_rmssd_ms=None if rmssd is None else round(rmssd, 2),
        hrv_sdnn_ms=None if sdnn is None else round(sdnn, 2),
        beats=len(peaks),
        quality=round(float(good.mean()), 3),
        duration_s=round(duration, 3),
    )


_ANSWER = msgspec.json.Encoder()


async def analyze(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        return error_response(415, "expected Content-Type: application/json")
    body = await request.read()
    try:
        window = _decoder.decode(body)
    except msgspec.ValidationError as e:
        at = _AT_PATH.search(str(e)) or _NAMED_FIELD.search(str(e))
        field = (at.group("path") or "$") if at else "$"
        return error_response(422, f"invalid field: {e}", {"field": field})
    except msgspec.DecodeError as e:
        return error_response(400, f"body is not valid JSON: {e}")
    try:
        # Numpy releases the GIL for most of it; the loop keeps answering probes meanwhile.
        estimate = await asyncio.to_thread(analyse, window.ppg, window.rate_hz)
    except AnalysisError as e:
        return error_response(422, str(e), {"field": "ppg"})
    return web.Response(
        body=_ANSWER.encode(
            {
                "heart_rate_bpm": estimate.heart_rate_bpm,
                "hrv_rmssd_ms": estimate.hrv_rmssd_ms,
                "hrv_sdnn_ms": estimate.hrv_sdnn_ms,
                "beats": estimate.beats,
                "quality": estimate.quality,
                "duration_s": estimate.duration_s,
            }
        ),
        content_type="application/json",
    )


async def _unrouted(request: web.Request) -> web.StreamResponse:
    """The catch-all route, so that a request no other route takes meets
    ``expect_continue`` too: 405 (with ``Allow``) for a known path, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return error_response(e.status, e.reason, headers=headers)
    except Exception as e:  # noqa: BLE001 - answer and log; never crash the server
        # Its routes have no variable parts: the path is a route template.
        return fault_response(request, request.path, e)


def create_app(settings: AnalysisSettings) -> web.Application:
    app = web.Application(client_max_size=_MAX_BODY, middlewares=[_errors_as_json])
    # No conditions of its own and no checker: every probe says the process answers, its
    # pid and uptime for the operator alone.
    probes = Probes(settings=settings, service_id=_SERVICE_ID)
    app[PROBES] = probes
    app.on_response_prepare.append(server_header)
    router = app.router
    # Every route meets Expect: 100-continue and refuses any other expectation as JSON.
    router.add_post("/analyze", analyze, expect_handler=expect_continue)
    for path, probe in probes.routes():
        router.add_get(path, probe, expect_handler=expect_continue)
    router.add_route("*", "/{path:.*}", _unrouted, expect_handler=expect_continue)
    return app


def _served_app(settings: AnalysisSettings, **process: object) -> web.Application:
    # Not traced, and no drops to report: the app needs nothing of the process's tracing
    # and logs the runtime hands every program.
    del process
    return create_app(settings)


def _port(settings: AnalysisSettings) -> int:
    return settings.port


ANALYSIS = Program(name=PROGRAM, create_app=_served_app, port=_port)


@contextlib.asynccontextmanager
async def running(settings: AnalysisSettings, *, host: str) -> AsyncIterator[Running]:
    """The app listening on ``host``:``settings.port`` (0: a free one, see ``Running.port``)
    as ``pulsecal-analysis`` serves it; leaving the block stops it."""
    async with serving.running(ANALYSIS, settings, host=host) as served:
        yield served


def main(argv: Sequence[str] | None = None) -> None:
    parse_program_args(PROGRAM, DESCRIPTION, AnalysisSettings, argv)
    settings = load_settings_or_exit(os.environ, AnalysisSettings)
    with setup_logging(settings, program=PROGRAM) as logs:
        serving.run(ANALYSIS, settings, logs=logs)
