"""Worker benchmark: persisted samples/s against the service's peak ingest rate, same run.

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/worker.py [--entries 200000] [--duration 10] [--sustain 60]
        [--episodes 0.3] [--no-service --rate 5000] [--per-entry 16 | --one-batch-format]

Every process under test is pinned to core 0 (``taskset -c 0``); the load side (wrk, the
stream writer, the harness's own ``redis-server``) to core 1. Postgres is the local one (a
throwaway database, created and dropped by the run; or its own cluster when none answers)
and is not pinned: it is the worker's database, not the worker.

1. Service peak: ``pulsecal-service`` under ``wrk -t1 -c64 -s wrk/ingest.lua`` (as
   ``bench/run.py`` runs it: 50 samples per batch, devices registered with
   ``pulsecal-admin``); its acknowledged samples/s is the figure to beat.
2. Worker throughput: the stream is pre-filled with ``--entries`` batches in the service's
   exact entry format (``shared.readings.encode_write``: one entry per write carrying
   ``--per-entry`` batches, the service's ``WRITE_MAX_BATCH`` by default, as its writes are
   under load: the batch JSON as wrk sends it and the time received; or, with
   ``--one-batch-format``, one batch per entry as older services wrote them,
   ``shared.readings.encode_entry``); then ``pulsecal-worker`` (analysis off) persists them.
   Rows/s and samples/s are measured between 10 % and 90 % of the way, from the persist
   group's acknowledgements (every entry holds the same number of batches). Each device
   sends one batch (one second of data) per second of its own clock, in rotation; with
   ``--episodes F`` a fraction F of the devices has ``hr`` 150 for 80 s out of every 120 s
   (so their ``hr_high`` alerts open and clear), the others stay between 60 and 100.
3. Sustained: a writer appends batches at the service's measured peak rate (``--rate``
   with ``--no-service``) for ``--sustain`` seconds while the worker runs; the backlog (the
   group's lag + pending, in batches) is sampled every second.

``--no-service`` skips step 1 (for a machine without wrk, or to measure the worker alone).

The report goes to stdout; raw figures to ``bench/results/worker.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

from shared.keys import Keys
from shared.readings import PERSIST_GROUP, encode_entry, encode_write
from shared.settings import variables

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import (  # noqa: E402 - bench/run.py's process and database helpers
    HUGE_BACKLOG,
    LOAD_CORE,
    SERVER_CORE,
    Bench,
    CpuWindow,
    HarnessError,
    RedisServer,
    ServerSpec,
    free_port,
    prepare_database,
    proc_ticks,
    register_devices,
    start_redis,
    wait_ready,
)

KEY_PREFIX = "bench:"
STREAM = Keys(KEY_PREFIX).readings
GROUP = PERSIST_GROUP
RATE_HZ = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The most batches one write of the service (so one readings entry) carries, by default.
WRITE_MAX_BATCH: int = {v.name: v.default for v in variables()}["WRITE_MAX_BATCH"]


def batch_body(device_id: str, seq: int, ts_ms: int, samples: int, rng: random.Random) -> bytes:
    """A batch as ``wrk/ingest.lua`` writes it (full double precision samples)."""
    phase = rng.random() * 10
    ppg = ",".join(
        "%.17g"
        % (
            0.5
            + 0.3 * math.sin(2 * math.pi * 1.2 * (i / RATE_HZ + phase))
            + (rng.random() - 0.5) * 0.02
        )
        for i in range(samples)
    )
    hr = 60 + rng.random() * 40
    spo2 = 95 + rng.random() * 4
    return (
        f'{{"device_id":"{device_id}","seq":{seq},"ts":{ts_ms},"rate_hz":{RATE_HZ},'
        f'"ppg":[{ppg}],"hr":{hr:.1f},"spo2":{spo2:.1f}}}'
    ).encode()


EPISODE_HR = 150.0  # above ALERT_HR_HIGH (120)
EPISODE_ON_S, EPISODE_CYCLE_S = 80, 120  # longer than ALERT_HR_DURATION (60 s), then normal


class Writer:
    """Appends batches to the stream in the service's entry format, from core 1:
    ``per_entry`` batches to an entry (0: one to an entry, in the one-batch format).

    Device ``i % n`` sends batch ``i``; its clock advances one second (one batch of 50
    samples at 50 Hz) each time its turn comes round.
    """

    def __init__(
        self,
        client: redis.Redis,
        devices: list[str],
        samples: int,
        *,
        episodes: float = 0.0,
        per_entry: int = WRITE_MAX_BATCH,
    ) -> None:
        self._client = client
        self._per_entry = per_entry
        # Batches per stream entry.
        self.batches_per_entry = max(1, per_entry)
        self._devices = devices
        self._rng = random.Random(7)
        # A few bodies per device, re-stamped with a new seq and ts for each entry.
        self._templates = [
            batch_body(d, 0, 0, samples, self._rng).split(b',"rate_hz"', 1)[1] for d in devices[:16]
        ]
        self._hot_templates = [
            t.split(b',"hr":', 1)[0] + b',"hr":%.1f,"spo2":97.0}' % EPISODE_HR
            for t in self._templates
        ]
        self._in_episodes = round(episodes * len(devices))
        self._seq = time.time_ns() // 1_000_000
        self._ts0 = self._seq
        self._i = 0
        self.samples = samples

    def entries(self, count: int) -> list[dict[bytes, bytes]]:
        """``count`` batches (a whole number of entries) in their entries."""
        received_ms = time.time_ns() // 1_000_000
        bodies = []
        n = len(self._devices)
        for _ in range(count):
            i = self._i
            self._i += 1
            second = i // n
            hot = i % n < self._in_episodes and second % EPISODE_CYCLE_S < EPISODE_ON_S
            templates = self._hot_templates if hot else self._templates
            body = b'{"device_id":"%s","seq":%d,"ts":%d,"rate_hz"%s' % (
                self._devices[i % n].encode(),
                self._seq + i,
                self._ts0 + second * 1000,
                templates[i % len(templates)],
            )
            bodies.append(body)
        if not self._per_entry:
            return [encode_entry(body, received_ms) for body in bodies]
        step = self._per_entry
        return [
            encode_write(received_ms, [(body, None) for body in bodies[start : start + step]])
            for start in range(0, len(bodies), step)
        ]

    def whole(self, count: int) -> int:
        """``count`` batches rounded up to a whole number of entries (at least one)."""
        per = self.batches_per_entry
        return max(1, -(-count // per)) * per

    def write(self, count: int) -> int:
        """Writes about ``count`` batches (rounded up to whole entries); how many."""
        count = self.whole(count)
        pipe = self._client.pipeline(transaction=False)
        for fields in self.entries(count):
            pipe.xadd(STREAM, fields)
        pipe.execute()
        return count


def acknowledged(client: redis.Redis, per_entry: int) -> tuple[int, int]:
    """(batches read by the persist group and acknowledged, lag + pending in batches), for
    entries of ``per_entry`` batches each."""
    for group in client.xinfo_groups(STREAM):
        if group["name"] == GROUP.encode():
            read = int(group.get("entries-read") or 0)
            pending = int(group["pending"])
            lag = group.get("lag")
            backlog = (int(lag) if lag is not None else 0) + pending
            return (read - pending) * per_entry, backlog * per_entry
    return 0, int(client.xlen(STREAM)) * per_entry


def start_worker(bench: Bench, env: dict[str, str], name: str) -> Any:
    port = free_port()
    worker_bin = Path(sys.executable).with_name("pulsecal-worker")
    proc = bench.procs.start(
        name,
        ["taskset", "-c", SERVER_CORE, str(worker_bin)],
        env={**os.environ, **env, "WORKER_PORT": str(port)},
    )
    wait_ready(proc, port, "/health/startup", timeout=60)
    return proc


def measure_worker(
    bench: Bench, client: redis.Redis, writer: Writer, env: dict[str, str], entries: int
) -> dict[str, Any]:
    client.delete(STREAM)
    entries = writer.whole(entries)
    done = 0
    while done < entries:
        done += writer.write(min(writer.whole(5000), entries - done))
    proc = start_worker(bench, env, "worker")
    window = CpuWindow({"worker": lambda: [proc.pid]})
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    window.start()
    while True:
        acked, backlog = acknowledged(client, writer.batches_per_entry)
        samples.append((time.monotonic(), acked))
        if backlog == 0 and acked >= entries:
            break
        if time.monotonic() - started > 600:
            raise HarnessError("the worker did not finish in 600 s")
        time.sleep(0.1)
    cpu = window.stop()
    bench.procs.stop(proc)
    lo = next(s for s in samples if s[1] >= entries * 0.1)
    hi = next(s for s in samples if s[1] >= entries * 0.9)
    total_s = samples[-1][0] - samples[0][0]
    # A stream a round or two hold is acknowledged between two samples: the overall rate.
    rows_per_s = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else entries / total_s
    return {
        "entries": entries,
        "rows_per_s": round(rows_per_s, 1),
        "samples_per_s": round(rows_per_s * writer.samples, 1),
        "total_s": round(total_s, 2),
        "rows_per_s_overall": round(entries / total_s, 1),
        "worker_cpu_pct": cpu["process_cpu_pct"]["worker"],
        "worker_us_per_row": round(
            cpu["process_cpu_pct"]["worker"] / 100 * cpu["wall_s"] / entries * 1e6, 1
        ),
        "cpu": cpu,
    }


def sustained(
    bench: Bench,
    client: redis.Redis,
    writer: Writer,
    env: dict[str, str],
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    client.delete(STREAM)
    proc = start_worker(bench, env, "worker-sustained")
    ticks0 = proc_ticks(proc.pid)
    backlog: list[int] = []
    stop = threading.Event()
    written = [0]

    def produce() -> None:
        # Pinned by the harness's own affinity (core 1); paced in 50 ms slices.
        next_at = time.monotonic()
        per_entry = writer.batches_per_entry
        owed = 0.0  # batches due and not yet written: whole entries only are
        while not stop.is_set():
            owed += rate * 0.05
            count = int(owed // per_entry) * per_entry
            if count:
                written[0] += writer.write(count)
                owed -= count
            next_at += 0.05
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    thread = threading.Thread(target=produce, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        while time.monotonic() - started < seconds:
            time.sleep(1.0)
            backlog.append(acknowledged(client, writer.batches_per_entry)[1])
    finally:
        stop.set()
        thread.join()
    wall = time.monotonic() - started
    cpu_s = (proc_ticks(proc.pid) - ticks0) / CLK_TCK
    drain_started = time.monotonic()
    per_entry = writer.batches_per_entry
    while acknowledged(client, per_entry)[1] > 0 and time.monotonic() - drain_started < 120:
        time.sleep(0.1)
    drained_s = time.monotonic() - drain_started
    bench.procs.stop(proc)
    return {
        "offered_rows_per_s": round(written[0] / wall, 1),
        "offered_samples_per_s": round(written[0] / wall * writer.samples, 1),
        "seconds": round(wall, 1),
        "backlog_per_second": backlog,
        "backlog_max": max(backlog) if backlog else 0,
        "backlog_last": backlog[-1] if backlog else 0,
        "drained_after_s": round(drained_s, 2),
        "worker_cpu_pct": round(100 * cpu_s / wall, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=200_000, help="batches pre-filled (200000)")
    p.add_argument("--duration", type=float, default=10.0, help="wrk seconds (10)")
    p.add_argument("--sustain", type=float, default=60.0, help="sustained-run seconds (60)")
    p.add_argument("--devices", type=int, default=32)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument(
        "--episodes", type=float, default=0.0, help="fraction of devices with hr episodes (0)"
    )
    p.add_argument("--no-service", action="store_true", help="skip the service's peak (wrk)")
    p.add_argument(
        "--rate", type=float, default=5000.0, help="sustained rows/s with --no-service (5000)"
    )
    p.add_argument(
        "--per-entry",
        type=int,
        default=WRITE_MAX_BATCH,
        help=f"batches to a stream entry, as one write of the service ({WRITE_MAX_BATCH})",
    )
    p.add_argument(
        "--one-batch-format",
        action="store_true",
        help="one batch to an entry, in the format older services wrote",
    )
    p.add_argument("--output", type=Path, default=BENCH / "results" / "worker.json")
    args = p.parse_args(argv)
    if args.per_entry < 1:
        p.error("--per-entry must be at least 1")
    # bench/run.py's Bench wants its own options; these are the ones it reads here.
    args.wrk_threads = 1
    args.warmup = 2.0
    args.quiet_threshold = 1000.0
    args.wait_quiet = 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    workdir = Path(tempfile.mkdtemp(prefix="pulsecal-bench-worker-"))
    bench = Bench(args, workdir)
    database = None
    try:
        bench.redis = start_redis(bench.procs, workdir)
        admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
        database = prepare_database(bench.procs, workdir, admin_url)
        devices = register_devices(database.url, args.devices, bench.devices_file, None)
        redis_server: RedisServer = bench.redis
        client = redis_server.client()
        common = {
            "REDIS_URL": redis_server.url,
            "DATABASE_URL": database.url,
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "LOG_DIR": str(workdir / "logs"),
            "ENVIRONMENT": "production",
        }

        # 1. The service's peak, as bench/run.py measures it.
        if args.no_service:
            peak = {"rps": args.rate, "non_2xx": 0, "cpu": {"process_cpu_pct": {}}}
        else:
            peak = service_peak(bench, args, common)
        peak_rps = peak["rps"] if not peak["non_2xx"] else 0.0
        peak_samples = peak_rps * args.samples
        client.flushall()

        # 2. The worker alone, on a full stream.
        writer = Writer(
            client,
            [d.device_id for d in devices],
            args.samples,
            episodes=args.episodes,
            per_entry=0 if args.one_batch_format else args.per_entry,
        )
        worker_env = {
            **common,
            "POD_NAME": "bench-worker",
            "ALERT_SILENCE_AFTER": "0",
            "AI_SERVICE_URL": "",
        }
        throughput = measure_worker(bench, client, writer, worker_env, args.entries)
        # A second database pass over the same rows: all duplicates (redelivery cost).
        with psycopg.connect(database.url) as conn:
            rows = conn.execute("SELECT count(*) FROM readings").fetchone()
        client.delete(STREAM)

        # 3. Sustained at the service's peak rate.
        sustain = sustained(bench, client, writer, worker_env, peak_rps, args.sustain)
        with psycopg.connect(database.url) as conn:
            alerts = conn.execute(
                "SELECT count(*), count(cleared_at) FROM alerts WHERE rule = 'hr_high'"
            ).fetchone()
        result = {
            "episodes": args.episodes,
            "hr_high_alerts": {"opened": alerts[0], "cleared": alerts[1]} if alerts else None,
            "service_measured": not args.no_service,
            "service_peak": {
                "rps": peak["rps"],
                "samples_per_s": round(peak_samples, 1),
                "non_2xx": peak["non_2xx"],
                "server_cpu_pct": peak["cpu"]["process_cpu_pct"].get("server"),
            },
            "worker": throughput,
            "rows_in_readings": rows[0] if rows else None,
            "worker_over_service_samples": round(throughput["samples_per_s"] / peak_samples, 2)
            if peak_samples
            else None,
            "sustained": sustain,
            "warnings": bench.warnings,
            "problems": bench.problems,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str))
        print(report(result))
        return 1 if bench.problems else 0
    except HarnessError as e:
        print(f"bench/worker.py: {e}", file=sys.stderr)
        return 2
    finally:
        bench.procs.stop_all()
        if database is not None:
            try:
                database.drop()
            except psycopg.Error as e:
                print(f"could not drop the bench database: {e}", file=sys.stderr)


def service_peak(bench: Bench, args: argparse.Namespace, common: dict[str, str]) -> Any:
    service_bin = Path(sys.executable).with_name("pulsecal-service")
    spec = ServerSpec(
        "service",
        (str(service_bin),),
        tuple(
            {
                **common,
                "POD_NAME": "bench",
                "READINGS_MAX_BACKLOG": HUGE_BACKLOG,
                "RATE_LIMIT_INGEST_MAX": "10000000",
            }.items()
        ),
    )
    server = bench.start_server(spec, "service")
    bench.wrk(server.port, args.warmup, server.proc.pid)
    peak = bench.wrk(server.port, args.duration, server.proc.pid)
    bench.stop_server(server, "service")
    return peak


def report(r: dict[str, Any]) -> str:
    s, w, u = r["service_peak"], r["worker"], r["sustained"]
    return "\n".join(
        [
            "| figure (core 0) | rows/s | samples/s |",
            "| --- | ---: | ---: |",
            (
                f"| service peak ingest (wrk, 50 samples/batch) | {s['rps']:,.0f} |"
                f" {s['samples_per_s']:,.0f} |"
                if r["service_measured"]
                else f"| service not measured (--no-service); sustained at | {s['rps']:,.0f} |"
                f" {s['samples_per_s']:,.0f} |"
            ),
            f"| worker, persisted (10-90 % of {w['entries']:,} batches) | {w['rows_per_s']:,.0f} |"
            f" {w['samples_per_s']:,.0f} |",
            "",
            f"devices in hr episodes: {r['episodes']:.0%}; hr_high alerts {r['hr_high_alerts']}",
            f"worker / service (samples/s): {r['worker_over_service_samples']}",
            f"worker CPU {w['worker_cpu_pct']} % of a core, {w['worker_us_per_row']} µs per row;"
            f" service CPU {s['server_cpu_pct']} %",
            f"sustained {u['seconds']} s at {u['offered_rows_per_s']:,.0f} rows/s"
            f" ({u['offered_samples_per_s']:,.0f} samples/s): backlog max {u['backlog_max']},"
            f" last {u['backlog_last']}, drained {u['drained_after_s']} s after the load stopped;"
            f" worker CPU {u['worker_cpu_pct']} %",
            f"backlog per second: {u['backlog_per_second']}",
            *(f"warning: {x}" for x in r["warnings"]),
            *(f"problem: {x}" for x in r["problems"]),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
