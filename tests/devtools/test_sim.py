"""The device simulator: a believable signal, and a clear verdict when nothing gets through."""

import cmath
import io
import math
import random
import statistics

from devtools.sim import PpgSignal, SimOptions, run

RATE_HZ = 50.0


def dominant_bpm(samples: list[int], rate_hz: float) -> float:
    """The strongest frequency between 40 and 200 beats per minute, by a plain DFT."""
    mean = statistics.fmean(samples)
    centred = [s - mean for s in samples]
    n = len(centred)

    def power(bpm: float) -> float:
        step = -2j * math.pi * (bpm / 60.0) / rate_hz
        return abs(sum(v * cmath.exp(step * k) for k, v in enumerate(centred)))

    return max((bpm / 2 for bpm in range(80, 401)), key=power) if n else 0.0


def signal_for(device_id: str, run_seed: int) -> PpgSignal:
    return PpgSignal(
        rate_hz=RATE_HZ, character=random.Random(device_id), noise=random.Random(run_seed)
    )


def test_ppg_pulse_rate_agrees_with_the_reported_heart_rate() -> None:
    for device_id in ("sim-001", "sim-002", "sim-003"):
        signal = signal_for(device_id, 7)
        samples: list[int] = []
        reported: list[float] = []
        for _ in range(30):
            batch, hr, _ = signal.next_samples(int(RATE_HZ))
            samples += batch
            reported.append(hr)

        assert abs(dominant_bpm(samples, RATE_HZ) - statistics.fmean(reported)) < 8, device_id


def test_ppg_stays_within_the_wire_limits_and_physiology() -> None:
    for i in range(40):
        signal = signal_for(f"sim-{i:03d}", i)
        for _ in range(120):
            samples, hr, spo2 = signal.next_samples(int(RATE_HZ))

            assert len(samples) == int(RATE_HZ)
            assert all(-1e9 <= s <= 1e9 for s in samples)
            assert 35 <= hr <= 185
            assert 85 <= spo2 <= 100
        assert 55 <= signal.resting_hr <= 110


def test_device_keeps_its_heart_rate_across_runs_but_not_its_noise() -> None:
    first, second = signal_for("sim-004", 1), signal_for("sim-004", 2)

    assert first.resting_hr == second.resting_hr
    assert first.next_samples(50)[0] != second.next_samples(50)[0]


async def test_sim_fails_and_says_so_when_nothing_is_acknowledged() -> None:
    out, err = io.StringIO(), io.StringIO()
    options = SimOptions(
        url="http://127.0.0.1:1",  # nothing listens on port 1
        devices={"sim-001": "pct_unused", "sim-002": "pct_unused"},
        duration=2.5,
        batch_seconds=0.5,
    )

    code = await run(options, out=out, err=err)

    assert code == 1
    assert " acked=0 " in out.getvalue()
    assert "errors=conn:" in out.getvalue()
    assert "nothing was acknowledged" in err.getvalue()
