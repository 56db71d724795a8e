"""``pulsecal-sim``: devices streaming synthetic PPG to the ingestion service.

Each device sends one batch per ``--batch-seconds`` over HTTP or its own WebSocket and
waits for the acknowledgement before the next. A batch that is refused for now (429/503,
a dropped connection) is sent again with the same ``seq`` until it is acknowledged; one
that is refused for good (4xx) is counted as given up. Nothing is dropped without a count.
"""

import argparse
import asyncio
import contextlib
import email.utils
import json
import math
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import aiohttp
import msgspec
from yarl import URL

from shared.cli import program_parser
from shared.wire import MAX_SAMPLES

__all__ = ("PpgSignal", "SimOptions", "main", "run")

# How long a device waits for one acknowledgement before it treats the link as broken.
_ACK_TIMEOUT = 10.0
# How long in-flight sends may finish after a stop request before they are cancelled.
_STOP_GRACE = 3.0
# A device that falls this far behind (a long outage) skips the oldest batches, counted,
# rather than building an unbounded backlog and then flooding the service.
_MAX_BACKLOG_SECONDS = 300.0
_BACKOFF_FIRST = 0.5
# Devices with episodes (--abnormal-fraction): one episode of 90 s in every 3 minutes.
_EPISODE_CYCLE = 180.0
_EPISODE_START = 60.0
_EPISODE_END = 150.0
_BACKOFF_CAP = 15.0
_PROGRESS_TTY_INTERVAL = 1.0
_PROGRESS_LOG_INTERVAL = 5.0
_WS_ENDS = frozenset(
    {
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSING,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimOptions:
    url: str
    devices: Mapping[str, str]
    ws_fraction: float = 0.5
    rate_hz: float = 50.0
    batch_seconds: float = 1.0
    duration: float = 0.0
    quiet: bool = False
    abnormal_fraction: float = 0.25

    @property
    def samples_per_batch(self) -> int:
        return round(self.rate_hz * self.batch_seconds)


@dataclass(slots=True)
class _Stats:
    started: float
    ws_devices: int
    http_devices: int
    sent: int = 0
    acked: int = 0
    duplicates: int = 0
    retries: int = 0
    samples: int = 0
    ws_open: int = 0
    unsent_at_exit: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    given_up: Counter[str] = field(default_factory=Counter)


class PpgSignal:
    """A plausible fingertip PPG: two-Gaussian pulses at a varying heart rate.

    Heart rate wanders slowly around the device's own resting rate, speeds up and slows
    down with breathing (sinus arrhythmia) and jitters beat to beat. Breathing also moves
    the baseline and the pulse amplitude; a slow drift, sensor noise and rare motion
    artifacts are added. Values are 18-bit ADC counts, as an optical front end reports.
    """

    def __init__(
        self,
        *,
        rate_hz: float,
        character: random.Random,
        noise: random.Random,
        episodes: bool = False,
    ) -> None:
        rng = character
        self._rng = noise
        self._dt = 1.0 / rate_hz
        self._resting_hr = rng.uniform(55.0, 110.0)
        self._slow_hr = self._resting_hr + rng.gauss(0.0, 2.0)
        self._rsa_bpm = rng.uniform(1.0, 4.0)
        self._beat_phase = rng.random()
        self._beat_stretch = 1.0
        self._resp_hz = rng.uniform(0.2, 0.33)
        self._resp_phase = rng.uniform(0.0, 2.0 * math.pi)
        self._dc = rng.uniform(80_000.0, 200_000.0)
        self._ac = self._dc * rng.uniform(0.005, 0.02)
        self._diastolic = rng.uniform(0.3, 0.6)
        self._diastolic_at = rng.uniform(0.42, 0.52)
        self._wander = rng.uniform(0.15, 0.4)
        self._modulation = rng.uniform(0.05, 0.15)
        self._drift = 0.0
        self._artifact_left = 0.0
        self._artifact_offset = 0.0
        self._spo2_rest = rng.uniform(95.5, 99.0)
        self._spo2 = self._spo2_rest
        # A device with episodes spends part of every cycle in tachycardia or desaturation,
        # past the worker's default alert thresholds for longer than their durations.
        self._episodes = episodes
        self._elapsed = rng.uniform(0.0, _EPISODE_CYCLE)
        self._episode_hr = rng.uniform(140.0, 160.0) if rng.random() < 0.5 else None
        self._episode_spo2 = 86.0 if self._episode_hr is None else None

    @property
    def resting_hr(self) -> float:
        return self._resting_hr

    def _pulse(self, phase: float) -> float:
        def bump(center: float, width: float) -> float:
            # Distance around the cycle, so the wave joins smoothly from one beat to the next.
            d = abs(phase - center)
            d = min(d, 1.0 - d)
            return math.exp(-0.5 * (d / width) ** 2)

        return bump(0.2, 0.07) + self._diastolic * bump(self._diastolic_at, 0.11)

    def next_samples(self, count: int) -> tuple[list[int], float, float]:
        """The next ``count`` samples, with the mean heart rate and SpO2 over them."""
        rng, dt = self._rng, self._dt
        # Ornstein-Uhlenbeck steps: a mean-reverting walk with a time constant and a spread.
        hr_pull, hr_kick = dt / 30.0, 4.0 * math.sqrt(2.0 * dt / 30.0)
        target_hr, target_spo2, spo2_tau = self._targets(count * dt)
        if target_hr != self._resting_hr:
            hr_pull = dt / 10.0
        drift_pull, drift_kick = dt / 20.0, 0.4 * self._ac * math.sqrt(2.0 * dt / 20.0)
        samples: list[int] = []
        hr_sum = 0.0
        for _ in range(count):
            self._slow_hr += (target_hr - self._slow_hr) * hr_pull + hr_kick * rng.gauss()
            self._resp_phase += 2.0 * math.pi * self._resp_hz * dt
            breath = math.sin(self._resp_phase)
            hr = min(180.0, max(40.0, self._slow_hr + self._rsa_bpm * breath))
            hr_sum += hr
            self._beat_phase += dt * hr / 60.0 / self._beat_stretch
            if self._beat_phase >= 1.0:
                self._beat_phase -= 1.0
                self._beat_stretch = 1.0 + rng.gauss(0.0, 0.015)
            self._drift += -self._drift * drift_pull + drift_kick * rng.gauss()
            amplitude = self._ac * (1.0 + self._modulation * math.sin(self._resp_phase + 0.6))
            value = (
                self._dc
                + amplitude * self._pulse(self._beat_phase)
                + self._ac * self._wander * breath
                + self._drift
                + rng.gauss(0.0, 0.015 * self._ac)
            )
            value += self._artifact(dt)
            samples.append(round(value))
        self._spo2 += (target_spo2 - self._spo2) * (count * dt / spo2_tau) + rng.gauss(0.0, 0.1)
        self._spo2 = min(100.0, max(85.0, self._spo2))
        mean_hr = hr_sum / count + rng.gauss(0.0, 0.8)
        return samples, round(min(400.0, max(0.0, mean_hr)), 1), round(self._spo2, 1)

    def _targets(self, seconds: float) -> tuple[float, float, float]:
        """Heart rate and SpO2 to drift towards now, and SpO2's time constant."""
        self._elapsed = (self._elapsed + seconds) % _EPISODE_CYCLE
        if not self._episodes or not _EPISODE_START <= self._elapsed < _EPISODE_END:
            return self._resting_hr, self._spo2_rest, 60.0
        hr = self._resting_hr if self._episode_hr is None else self._episode_hr
        spo2 = self._spo2_rest if self._episode_spo2 is None else self._episode_spo2
        return hr, spo2, 20.0

    def _artifact(self, dt: float) -> float:
        # About one motion artifact a minute: a step and heavy noise for up to 1.5 s.
        rng = self._rng
        if self._artifact_left <= 0.0:
            if rng.random() >= dt / 60.0:
                return 0.0
            self._artifact_left = rng.uniform(0.3, 1.5)
            self._artifact_offset = rng.gauss(0.0, 2.0 * self._ac)
        self._artifact_left -= dt
        return self._artifact_offset + rng.gauss(0.0, 0.5 * self._ac)


@dataclass(frozen=True, slots=True)
class _Batch:
    seq: int
    samples: int
    body: bytes


@dataclass(frozen=True, slots=True)
class _Acked:
    duplicate: bool
    accepted: int


@dataclass(frozen=True, slots=True)
class _Retry:
    """Not stored yet; send the same batch again after ``after`` seconds (or a backoff)."""

    key: str
    message: str
    after: float | None = None


@dataclass(frozen=True, slots=True)
class _Rejected:
    """Refused for good: sending it again cannot succeed."""

    key: str
    message: str


_Outcome = _Acked | _Retry | _Rejected


class _Link(Protocol):
    async def open(self) -> None: ...

    async def send(self, batch: _Batch) -> _Outcome: ...

    async def close(self) -> None: ...


def _seconds(raw: object) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    raw = None if headers is None else headers.get("Retry-After")
    if raw is None:
        return None
    seconds = _seconds(raw.strip())
    if seconds is not None:
        return seconds
    # The header may also be an HTTP date.
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ""
    text = f"{error.get('code', '?')}: {error.get('message', '')}"
    details = error.get("details")
    return f"{text} {json.dumps(details)}" if details else text


class _HttpLink:
    def __init__(self, *, session: aiohttp.ClientSession, url: URL, token: str) -> None:
        self._session = session
        self._url = url
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def open(self) -> None:
        """Nothing to open: HTTP devices share the session's connection pool."""

    async def close(self) -> None:
        pass

    async def send(self, batch: _Batch) -> _Outcome:
        try:
            async with self._session.post(
                self._url, data=batch.body, headers=self._headers
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = _retry_after(response.headers)
        except TimeoutError:
            return _Retry("timeout", f"no response within {self._session.timeout.total}s")
        except (aiohttp.ClientError, OSError) as e:
            return _Retry("conn", f"{type(e).__name__}: {e}")
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        if status == 202:
            if not isinstance(body, dict) or body.get("seq") != batch.seq:
                return _Retry("bad-ack", f"202 with an unexpected body: {raw[:200]!r}")
            accepted = body.get("accepted")
            return _Acked(
                duplicate=body.get("duplicate") is True,
                accepted=accepted if isinstance(accepted, int) else batch.samples,
            )
        message = _error_text(body) or raw[:200].decode(errors="replace")
        if status in (408, 429) or status >= 500:
            return _Retry(str(status), message, retry_after)
        return _Rejected(str(status), message)


@dataclass(slots=True)
class _WsConnection:
    ws: aiohttp.ClientWebSocketResponse
    replies: asyncio.Queue[aiohttp.WSMessage]
    reader: asyncio.Task[None] | None = None
    counted_open: bool = True


class _WsLink:
    def __init__(
        self, *, session: aiohttp.ClientSession, url: URL, token: str, stats: _Stats
    ) -> None:
        self._session = session
        self._url = url
        self._headers = {"Authorization": f"Bearer {token}"}
        self._stats = stats
        self._conn: _WsConnection | None = None

    async def _connect(self) -> _WsConnection | _Retry:
        try:
            ws = await self._session.ws_connect(
                self._url,
                headers=self._headers,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            )
        except aiohttp.WSServerHandshakeError as e:
            return _Retry(str(e.status), f"upgrade refused: {e.message}", _retry_after(e.headers))
        except TimeoutError:
            return _Retry("timeout", "WebSocket upgrade timed out")
        except (aiohttp.ClientError, OSError) as e:
            return _Retry("conn", f"{type(e).__name__}: {e}")
        self._stats.ws_open += 1
        conn = _WsConnection(ws, asyncio.Queue())
        conn.reader = asyncio.create_task(self._read(conn))
        return conn

    async def _read(self, conn: _WsConnection) -> None:
        # The device listens all the time, as a real one does: a close sent while it is idle
        # (1001 when the service shuts down) is seen at once, not when the next send fails.
        while True:
            message = await conn.ws.receive()
            conn.replies.put_nowait(message)
            if message.type in _WS_ENDS:
                self._uncount(conn)
                return

    def _uncount(self, conn: _WsConnection) -> None:
        if conn.counted_open:
            conn.counted_open = False
            self._stats.ws_open -= 1

    async def open(self) -> None:
        # Connect before the first batch is due, as a device does when it starts; a failure
        # here is retried, and counted, when that batch is sent.
        connected = await self._connect()
        if not isinstance(connected, _Retry):
            self._conn = connected

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._uncount(conn)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            await conn.ws.close()
        if conn.reader is not None:
            conn.reader.cancel()
            await asyncio.wait([conn.reader])
            # receive() reports network trouble as messages; anything it raises is a bug.
            if not conn.reader.cancelled() and (failure := conn.reader.exception()) is not None:
                raise failure

    async def send(self, batch: _Batch) -> _Outcome:
        conn = self._conn
        if conn is not None and (conn.ws.closed or conn.reader is None or conn.reader.done()):
            await self.close()
            code = conn.ws.close_code
            return _Retry(f"ws-close:{code}", f"server closed the connection ({code})")
        if conn is None:
            connected = await self._connect()
            if isinstance(connected, _Retry):
                return connected
            self._conn = conn = connected
        try:
            await conn.ws.send_str(batch.body.decode())
            message = await asyncio.wait_for(conn.replies.get(), _ACK_TIMEOUT)
        except TimeoutError:
            # A late ack would be taken for the next batch's: start over on a new connection.
            await self.close()
            return _Retry("timeout", f"no acknowledgement within {_ACK_TIMEOUT}s")
        except (aiohttp.ClientError, OSError) as e:
            await self.close()
            return _Retry("conn", f"{type(e).__name__}: {e}")
        if message.type is not aiohttp.WSMsgType.TEXT:
            await self.close()
            code = conn.ws.close_code
            if message.type in _WS_ENDS and message.type is not aiohttp.WSMsgType.ERROR:
                return _Retry(f"ws-close:{code}", f"server closed the connection ({code})")
            return _Retry("conn", f"WebSocket {message.type.name}: {message.data!r}")
        try:
            reply: Any = json.loads(message.data)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and reply.get("ack") == batch.seq:
            return _Acked(duplicate=reply.get("duplicate") is True, accepted=batch.samples)
        error = reply.get("error") if isinstance(reply, dict) else None
        if not isinstance(error, dict) or reply.get("seq") not in (batch.seq, None):
            await self.close()
            return _Retry("bad-ack", f"unexpected reply: {str(message.data)[:200]}")
        key = f"ws:{error.get('code', '?')}"
        after = _seconds(error.get("retry_after"))
        if after is not None:
            return _Retry(key, _error_text(reply), after)
        return _Rejected(key, _error_text(reply))


class _Reporter:
    def __init__(self, *, stats: _Stats, out: TextIO, err: TextIO, quiet: bool) -> None:
        self._stats = stats
        self._out = out
        self._err = err
        self._quiet = quiet
        self._tty = out.isatty()
        self._line_shown = False
        self._seen_errors: set[str] = set()
        self._last_time = stats.started
        self._last_samples = 0

    @property
    def interval(self) -> float:
        return _PROGRESS_TTY_INTERVAL if self._tty else _PROGRESS_LOG_INTERVAL

    def _clear_line(self) -> None:
        if self._line_shown:
            self._out.write("\r\x1b[K")
            self._out.flush()
            self._line_shown = False

    def first_error(self, device_id: str, key: str, message: str) -> None:
        """Say what an error means the first time it happens; after that it is only counted."""
        if key in self._seen_errors:
            return
        self._seen_errors.add(key)
        if self._quiet:
            return
        self._clear_line()
        print(f"pulsecal-sim: {device_id}: {key}: {message}", file=self._err, flush=True)

    def progress(self, now: float) -> None:
        stats = self._stats
        rate = (stats.samples - self._last_samples) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_samples = now, stats.samples
        if self._quiet:
            return
        errors = " ".join(f"{k}={n}" for k, n in sorted(stats.errors.items())) or "none"
        line = (
            f"[{now - stats.started:5.0f}s] sent {stats.sent} acked {stats.acked}"
            f" dup {stats.duplicates} retries {stats.retries}"
            f" given-up {sum(stats.given_up.values())} | {rate:,.0f} samples/s"
            f" | ws {stats.ws_open}/{stats.ws_devices} open | errors {errors}"
        )
        if self._tty:
            width = shutil.get_terminal_size().columns
            # A line that wraps cannot be rewritten with \r.
            self._out.write("\r\x1b[K" + line[: max(width - 1, 20)])
            self._line_shown = True
        else:
            self._out.write(line + "\n")
        self._out.flush()

    def summary(self, now: float) -> None:
        self._clear_line()
        stats = self._stats
        elapsed = now - stats.started
        errors = ",".join(f"{k}:{n}" for k, n in sorted(stats.errors.items())) or "none"
        given_up = ",".join(f"{k}:{n}" for k, n in sorted(stats.given_up.items())) or "none"
        print(
            f"pulsecal-sim summary: elapsed={elapsed:.1f}s"
            f" devices={stats.ws_devices + stats.http_devices}"
            f" ws={stats.ws_devices} http={stats.http_devices}"
            f" sent={stats.sent} acked={stats.acked} duplicates={stats.duplicates}"
            f" retries={stats.retries} given_up={sum(stats.given_up.values())}"
            f" unsent_at_exit={stats.unsent_at_exit} samples={stats.samples}"
            f" samples_per_s={stats.samples / max(elapsed, 1e-9):.0f}"
            f" errors={errors} given_up_by={given_up}",
            file=self._out,
            flush=True,
        )


class _Backoff:
    def __init__(self, *, rng: random.Random) -> None:
        self._rng = rng
        self._delay = _BACKOFF_FIRST

    def next(self) -> float:
        # Jittered, so devices that lost the service together do not come back together.
        delay = self._rng.uniform(self._delay / 2, self._delay)
        self._delay = min(_BACKOFF_CAP, self._delay * 2)
        return delay

    def reset(self) -> None:
        self._delay = _BACKOFF_FIRST


async def _sleep_unless_stopped(delay: float, stop: asyncio.Event) -> bool:
    """Sleep ``delay`` seconds; False if ``stop`` was set first."""
    if stop.is_set():
        return False
    if delay <= 0:
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return not stop.is_set()


class _Device:
    def __init__(
        self,
        *,
        device_id: str,
        link: _Link,
        options: SimOptions,
        stats: _Stats,
        reporter: _Reporter,
        first_seq: int,
        clock_origin: tuple[float, int],
        episodes: bool = False,
    ) -> None:
        self.device_id = device_id
        self._link = link
        self._options = options
        self._stats = stats
        self._reporter = reporter
        self._first_seq = first_seq
        self._clock_origin = clock_origin
        # A device keeps its heart rate and pulse shape from run to run; its noise differs.
        self._rng = random.Random(f"{device_id}:{first_seq}")
        self._signal = PpgSignal(
            rate_hz=options.rate_hz,
            character=random.Random(device_id),
            noise=self._rng,
            episodes=episodes,
        )
        self._backoff = _Backoff(rng=self._rng)

    def _batch(self, index: int, start: float) -> _Batch:
        samples, hr, spo2 = self._signal.next_samples(self._options.samples_per_batch)
        mono0, epoch0_ms = self._clock_origin
        seq = self._first_seq + index
        body = msgspec.json.encode(
            {
                "device_id": self.device_id,
                "seq": seq,
                "ts": epoch0_ms + round((start - mono0) * 1000),
                "rate_hz": self._options.rate_hz,
                "ppg": samples,
                "hr": hr,
                "spo2": spo2,
            }
        )
        return _Batch(seq=seq, samples=len(samples), body=body)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        period = self._options.batch_seconds
        max_behind = max(1, math.ceil(_MAX_BACKLOG_SECONDS / period))
        # Devices start at different points of the period, as real ones would.
        start = loop.time() + self._rng.uniform(0.0, period)
        index = 0
        holding = False
        try:
            await self._link.open()
            while True:
                due = start + (index + 1) * period
                if not await _sleep_unless_stopped(due - loop.time(), stop):
                    break
                behind = int((loop.time() - due) / period)
                if behind > max_behind:
                    skipped = behind - max_behind
                    for _ in range(skipped):
                        self._signal.next_samples(self._options.samples_per_batch)
                    self._stats.given_up["backlog"] += skipped
                    self._reporter.first_error(
                        self.device_id,
                        "backlog",
                        f"over {_MAX_BACKLOG_SECONDS:.0f}s behind; skipping the oldest batches",
                    )
                    index += skipped
                    due = start + (index + 1) * period
                holding = True
                done = await self._deliver(self._batch(index, due - period), stop)
                holding = not done
                if not done:
                    break
                index += 1
        finally:
            # Whatever was due but not acknowledged when the simulator stopped.
            due_batches = max(0, int((loop.time() - start) / period))
            self._stats.unsent_at_exit += max(int(holding), due_batches - index)
            await self._link.close()

    async def _deliver(self, batch: _Batch, stop: asyncio.Event) -> bool:
        """Send until acknowledged or refused for good; False if stopped first."""
        stats = self._stats
        attempt = 0
        while not stop.is_set():
            if attempt:
                stats.retries += 1
            attempt += 1
            stats.sent += 1
            outcome = await self._link.send(batch)
            if isinstance(outcome, _Acked):
                self._backoff.reset()
                stats.acked += 1
                stats.samples += batch.samples
                stats.duplicates += outcome.duplicate
                return True
            stats.errors[outcome.key] += 1
            self._reporter.first_error(self.device_id, outcome.key, outcome.message)
            if isinstance(outcome, _Rejected):
                stats.given_up[outcome.key] += 1
                return True
            if outcome.after is None:
                delay = self._backoff.next()
            else:
                # Never earlier than asked; a little later, so retries do not arrive in step.
                delay = outcome.after * self._rng.uniform(1.0, 1.2)
            if not await _sleep_unless_stopped(delay, stop):
                return False
        return False


def _uses_ws(index: int, fraction: float) -> bool:
    # Spreads WebSocket devices evenly through the list rather than putting them first.
    return math.floor((index + 1) * fraction + 1e-9) > math.floor(index * fraction + 1e-9)


async def _report(reporter: _Reporter, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while await _sleep_unless_stopped(reporter.interval, stop):
        reporter.progress(loop.time())


async def run(options: SimOptions, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Simulate until ``duration`` passes or SIGINT/SIGTERM; 0 if anything was acknowledged."""
    loop = asyncio.get_running_loop()
    device_ids = sorted(options.devices)
    ws_flags = [_uses_ws(i, options.ws_fraction) for i in range(len(device_ids))]
    abnormal = options.abnormal_fraction
    stats = _Stats(
        started=loop.time(), ws_devices=sum(ws_flags), http_devices=len(ws_flags) - sum(ws_flags)
    )
    reporter = _Reporter(
        stats=stats, out=out or sys.stdout, err=err or sys.stderr, quiet=options.quiet
    )
    stop = asyncio.Event()
    device_tasks: list[asyncio.Task[None]] = []
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:
            # A second Ctrl-C: do not wait for in-flight sends.
            for task in device_tasks:
                task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
            loop.add_signal_handler(signum, on_signal)
    if options.duration > 0:
        loop.call_later(options.duration, stop.set)

    # Seqs start at the current epoch ms and grow by one a batch, and a batch lasts at least
    # a millisecond: the clock outruns them, so a restarted simulator starts above every seq
    # it used before and never hits a stored one.
    first_seq = time.time_ns() // 1_000_000
    clock_origin = (loop.time(), first_seq)
    base = URL(options.url)
    http_url = base.with_path("/ingestion/ppg")
    ws_url = base.with_scheme("wss" if base.scheme == "https" else "ws").with_path("/ingestion/ws")
    connector = aiohttp.TCPConnector(limit=0)  # one connection per device, as real ones
    timeout = aiohttp.ClientTimeout(total=_ACK_TIMEOUT, connect=5.0)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for device_id, ws in zip(device_ids, ws_flags, strict=True):
                token = options.devices[device_id]
                link: _Link = (
                    _WsLink(session=session, url=ws_url, token=token, stats=stats)
                    if ws
                    else _HttpLink(session=session, url=http_url, token=token)
                )
                device = _Device(
                    device_id=device_id,
                    link=link,
                    options=options,
                    stats=stats,
                    reporter=reporter,
                    first_seq=first_seq,
                    clock_origin=clock_origin,
                    # Counted from the end, so they do not all use the same transport.
                    episodes=_uses_ws(len(device_ids) - 1 - len(device_tasks), abnormal),
                )
                device_tasks.append(asyncio.create_task(device.run(stop), name=device_id))
            report_task = asyncio.create_task(_report(reporter, stop))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([stopped, *device_tasks], return_when=asyncio.FIRST_COMPLETED)
            # A device task only ends early on a bug: stop the rest and show it below.
            stop.set()
            _, pending = await asyncio.wait(device_tasks, timeout=_STOP_GRACE)
            for task in pending:
                task.cancel()
            results = await asyncio.gather(*device_tasks, report_task, return_exceptions=True)
            stopped.cancel()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
    reporter.summary(loop.time())
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures:
        if not isinstance(failure, asyncio.CancelledError):
            print(f"pulsecal-sim: a device task failed: {failure!r}", file=err or sys.stderr)
    if stats.acked == 0:
        print("pulsecal-sim: nothing was acknowledged", file=err or sys.stderr)
        return 1
    return 0


def _positive(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {raw}")
    return value


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {raw}")
    return value


def _non_negative(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {raw}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = program_parser(
        "pulsecal-sim", "Simulate wearable devices streaming PPG to pulsecal-service."
    )
    parser.add_argument("--url", default="http://127.0.0.1:3001", help="service base URL")
    parser.add_argument(
        "--devices-file",
        required=True,
        type=Path,
        help="JSON object mapping device id to its token (pulsecal-admin device add)",
    )
    parser.add_argument(
        "--ws-fraction",
        type=_fraction,
        default=0.5,
        help="share of devices on WebSocket; the rest use HTTP (default 0.5)",
    )
    parser.add_argument("--rate-hz", type=_positive, default=50.0, help="sample rate (50)")
    parser.add_argument(
        "--batch-seconds", type=_positive, default=1.0, help="seconds of signal per batch (1.0)"
    )
    parser.add_argument(
        "--duration", type=_non_negative, default=0.0, help="seconds to run; 0 runs until Ctrl-C"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress or error lines, only the final summary"
    )
    parser.add_argument(
        "--abnormal-fraction",
        type=_fraction,
        default=0.25,
        help="share of devices with episodes of tachycardia or low SpO2 that cross the"
        " worker's alert thresholds (default 0.25)",
    )
    return parser


def _load_devices(parser: argparse.ArgumentParser, path: Path) -> dict[str, str]:
    try:
        devices: Any = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"cannot read {path}: {e}")
    if (
        not isinstance(devices, dict)
        or not devices
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in devices.items())
    ):
        parser.error(f"{path}: expected a non-empty JSON object of device id to token")
    return devices


def _options(argv: Sequence[str] | None) -> SimOptions:
    parser = _parser()
    args = parser.parse_args(argv)
    options = SimOptions(
        url=args.url,
        devices=_load_devices(parser, args.devices_file),
        ws_fraction=args.ws_fraction,
        rate_hz=args.rate_hz,
        batch_seconds=args.batch_seconds,
        duration=args.duration,
        quiet=args.quiet,
        abnormal_fraction=args.abnormal_fraction,
    )
    if not 1 <= options.samples_per_batch <= MAX_SAMPLES:
        parser.error(
            f"--rate-hz x --batch-seconds gives {options.samples_per_batch} samples per batch;"
            f" a batch holds 1 to {MAX_SAMPLES}"
        )
    if options.batch_seconds < 0.001:
        parser.error("--batch-seconds: at least 0.001 (seqs are numbered from the clock in ms)")
    if options.rate_hz > 10_000:
        parser.error("--rate-hz: the service accepts at most 10000")
    if URL(options.url).scheme not in ("http", "https"):
        parser.error("--url: expected an http:// or https:// URL")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    options = _options(argv)
    raise SystemExit(asyncio.run(run(options)))


if __name__ == "__main__":
    main()
