"""Redis Cluster: how the service's writes spread over the primaries, and what a batch costs one.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/cluster.py [--devices 1000] [--partitions 12] [--seconds 20]

Two runs of the same load, one after the other:

- ``cluster``: a local Redis Cluster (``tests/support/cluster.py``: 3 primaries, a replica
  each) and ``pulsecal-service`` with ``REDIS_CLUSTER=true INGEST_PARTITIONS=P`` (its write
  connections go to each partition's primary);
- ``single``: one plain ``redis-server`` (with a replica when the cluster's primaries have
  them, so that it feeds a replica as each of them does) and the service with
  ``INGEST_PARTITIONS=1``, then with ``INGEST_PARTITIONS=P``: the same split of the writes
  without the cluster, which tells what fewer batches per write cost from what the cluster
  does.

The load: ``--devices`` devices registered in a throwaway database of the local Postgres (or
an ``initdb`` cluster of its own when none answers: ``bench/run.py``'s ``prepare_database``),
spread over ``--connections`` HTTP keep-alive connections, each connection sending its
devices' next seq in turn (one request in flight per connection, so a device's seqs arrive
in order) for a warm-up and then ``--seconds``. Rate limiting stays on with a limit the load
never reaches, as in ``bench/run.py``. ``ACK_MODE`` is ``--ack-mode`` (primary by default).

What is measured over the window, per Redis node: its CPU (``used_cpu_sys + used_cpu_user``
from ``INFO cpu``, before and after) and, per primary, the stream entries and batches its
partitions stored (entries whose ids fall in the window, each decoded to count its batches:
one entry is one write of the service and carries every batch of that write). From these:
each primary's share of devices, batches and Redis CPU, checked within +-15 % of the mean
share (PASS/FAIL); Redis CPU us per batch per shard against the single Redis's; the mean
batches per write on each (splitting the writes over P partitions makes each carry fewer,
which raises the per-batch cost); and the projected capacity of one shard at a CPU budget
(``--budget``, 0.7 of a core by default) and the shards that hold 1,000,000 devices at one
batch a second.

Nothing is pinned: the service, the load generator (this process) and the Redis nodes share
the machine's cores, so throughput here says little; Redis CPU per batch is the figure.
Every process this starts is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/run.py

import psycopg
import redis
import uvloop
from run import (
    Database,
    HarnessError,
    Processes,
    _busy_pct,
    core_times,
    free_port,
    prepare_database,
    wait_ready,
    workspace,
)

from shared.devices import add_device
from shared.keys import Keys
from shared.partitions import partition_index
from shared.readings import decode_entries
from shared.schema import upgrade_schema
from tests.support.cluster import LocalCluster

KEYS = Keys("bench:")
SHARE_TOLERANCE = 0.15
TARGET_DEVICES = 1_000_000


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    device_id: str
    token: str


async def register(database_url: str, count: int) -> list[Device]:
    """``count`` devices with their tokens, added in this process (``pulsecal-admin device add``
    does the same, one process per device)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await upgrade_schema(conn)
        return [
            Device(device_id, await add_device(conn, device_id, rotate=True))
            for device_id in (f"bench-{i:04d}" for i in range(count))
        ]


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    """Counts of what the load generator was answered, from ``start``."""

    sent: int = 0
    accepted: int = 0  # 202
    other: dict[str, int] = field(default_factory=dict)  # status (or error) -> count
    stop: bool = False


def body_tail(rng: random.Random, samples: int) -> bytes:
    ppg = ",".join(f"{0.5 + 0.3 * math.sin(i / 7 + rng.random()):.17g}" for i in range(samples))
    hr, spo2 = 60 + rng.random() * 40, 95 + rng.random() * 4
    return f',"rate_hz":50,"ppg":[{ppg}],"hr":{hr:.1f},"spo2":{spo2:.1f}}}'.encode()


async def connection(
    port: int, devices: Sequence[Device], seqs: dict[str, int], tail: bytes, load: Load
) -> None:
    """One keep-alive connection posting each of its devices' next seq in turn."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    heads = [
        (
            device,
            (
                "POST /ingestion/ppg HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {device.token}\r\nContent-Type: application/json\r\n"
            ).encode(),
        )
        for device in devices
    ]
    try:
        n = 0
        while not load.stop:
            device, head = heads[n % len(heads)]
            n += 1
            seq = seqs[device.device_id]
            seqs[device.device_id] = seq + 1
            body = b'{"device_id":"%s","seq":%d,"ts":%d%s' % (
                device.device_id.encode(),
                seq,
                int(time.time() * 1000),
                tail,
            )
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            load.sent += 1
            header = await reader.readuntil(b"\r\n\r\n")
            status = int(header[9:12])
            length = 0
            for line in header.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status == 202:
                load.accepted += 1
            else:
                load.other[str(status)] = load.other.get(str(status), 0) + 1
    except (OSError, asyncio.IncompleteReadError) as e:
        load.other[type(e).__name__] = load.other.get(type(e).__name__, 0) + 1
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def driving(
    port: int, devices: Sequence[Device], connections: int, samples: int, first_seq: int
) -> Any:
    """The load runs while the block does; yields its counters."""
    load = Load()
    seqs = {d.device_id: first_seq for d in devices}
    rng = random.Random(7)
    tasks = [
        asyncio.create_task(
            connection(port, devices[c::connections], seqs, body_tail(rng, samples), load)
        )
        for c in range(min(connections, len(devices)))
    ]
    try:
        yield load
    finally:
        load.stop = True
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- measuring


@dataclass
class Node:
    """A Redis the run measures: a cluster node or the single server."""

    name: str  # host:port
    role: str  # primary / replica
    client: Callable[[], redis.Redis]
    streams: list[str] = field(default_factory=list)  # partition streams it serves
    devices: int = 0
    cpu0: float = 0.0
    cpu_s: float = 0.0
    exec0: float = 0.0
    exec_s: float = 0.0  # EXEC's own time (INFO commandstats): the writes' execution
    idle_rate: float = 0.0  # CPU s per s with the service up and no load
    idle_cpu_s: float = 0.0  # that rate over the measured window
    entries: int = 0
    batches: int = 0

    def cpu(self) -> float:
        client = self.client()
        try:
            info: dict[str, Any] = client.info("cpu")
        finally:
            client.close()
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def exec_seconds(self) -> float:
        """The time EXEC has taken (its transactions, queued commands and script included)."""
        client = self.client()
        try:
            info: dict[str, Any] = client.info("commandstats")
        finally:
            client.close()
        return float(info.get("cmdstat_exec", {}).get("usec", 0)) / 1e6

    @property
    def us_per_batch(self) -> float | None:
        return self.cpu_s / self.batches * 1e6 if self.batches else None

    @property
    def net_us_per_batch(self) -> float | None:
        """Without what the node used idle (cluster bus, cron, the service's own checks)."""
        return (self.cpu_s - self.idle_cpu_s) / self.batches * 1e6 if self.batches else None


def window_counts(client: redis.Redis, stream: str, t0_ms: int, t1_ms: int) -> tuple[int, int]:
    """(entries, batches) of ``stream`` whose ids fall in [t0_ms, t1_ms]."""
    entries = batches = 0
    start: str = str(t0_ms)
    while True:
        reply = client.xrange(stream, start, str(t1_ms), count=1000)
        page = cast(list[tuple[bytes, dict[bytes, bytes]]], reply or [])
        entries += len(page)
        batches += sum(len(decode_entries(fields)) for _id, fields in page)
        if len(page) < 1000:
            return entries, batches
        start = "(" + page[-1][0].decode()


@dataclass
class Run:
    name: str
    partitions: int
    nodes: list[Node]
    seconds: float = 0.0
    load: Load = field(default_factory=Load)
    busy_pct: float = 0.0  # every core's busy time over the window, in % of one core

    @property
    def primaries(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "primary"]

    def totals(self) -> tuple[float, int, int]:
        """(primary CPU s, entries, batches) over every primary."""
        ps = self.primaries
        return sum(n.cpu_s for n in ps), sum(n.entries for n in ps), sum(n.batches for n in ps)

    def idle_cpu_s(self) -> float:
        return sum(n.idle_cpu_s for n in self.primaries)

    def exec_s(self) -> float:
        return sum(n.exec_s for n in self.primaries)

    def us_per_batch(self) -> float | None:
        cpu, _entries, batches = self.totals()
        return cpu / batches * 1e6 if batches else None


async def measure(
    run: Run,
    port: int,
    devices: Sequence[Device],
    args: argparse.Namespace,
    first_seq: int,
) -> None:
    # Idle first: the service up, no load; what each node uses anyway.
    for node in run.nodes:
        node.cpu0 = await asyncio.to_thread(node.cpu)
    idle_started = time.monotonic()
    await asyncio.sleep(args.idle)
    idle = time.monotonic() - idle_started
    for node in run.nodes:
        node.idle_rate = (await asyncio.to_thread(node.cpu) - node.cpu0) / idle
    async with driving(port, devices, args.connections, args.samples, first_seq) as load:
        await asyncio.sleep(args.warmup)
        sent0, accepted0 = load.sent, load.accepted
        t0_ms = int(time.time() * 1000) + 1
        for node in run.nodes:
            node.cpu0 = await asyncio.to_thread(node.cpu)
            node.exec0 = await asyncio.to_thread(node.exec_seconds)
        started = time.monotonic()
        cores0 = core_times()
        await asyncio.sleep(args.seconds)
        run.busy_pct = sum(_busy_pct(cores0, core_times()).values())
        for node in run.nodes:
            node.cpu_s = await asyncio.to_thread(node.cpu) - node.cpu0
            node.exec_s = await asyncio.to_thread(node.exec_seconds) - node.exec0
        run.seconds = time.monotonic() - started
        for node in run.nodes:
            node.idle_cpu_s = node.idle_rate * run.seconds
        t1_ms = int(time.time() * 1000) - 1
        sent1, accepted1 = load.sent, load.accepted
    run.load = Load(sent1 - sent0, accepted1 - accepted0, dict(load.other))
    for node in run.primaries:
        client = node.client()
        try:
            for stream in node.streams:
                entries, batches = window_counts(client, stream, t0_ms, t1_ms)
                node.entries += entries
                node.batches += batches
        finally:
            client.close()


# --------------------------------------------------------------------------- the runs


def service_env(args: argparse.Namespace, database: Database, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PORT": str(port),
        "DATABASE_URL": database.url,
        "POD_NAME": "bench",
        "REDIS_KEY_PREFIX": KEYS.prefix,
        "READINGS_MAX_BACKLOG": "1000000000000",
        # Limiting stays on (its GCRA runs in every write) but never refuses this load.
        "RATE_LIMIT_INGEST_MAX": "10000000",
        "ACK_MODE": args.ack_mode,
        "ACK_REPLICAS": "1",
    }


@contextlib.contextmanager
def service(procs: Processes, env: dict[str, str], label: str) -> Iterator[int]:
    binary = Path(sys.executable).with_name("pulsecal-service")
    if not binary.exists():
        raise HarnessError(f"{binary} is missing: run make install")
    proc = procs.start(f"service-{label}", [str(binary)], env=env)
    try:
        port = int(env["PORT"])
        wait_ready(proc, port)
        wait_ready(proc, port, "/health/readiness", timeout=30.0)
        yield port
        if not proc.alive():
            raise HarnessError(f"the service died during the {label} run:\n{proc.log_tail()}")
    finally:
        procs.stop(proc)


def devices_per_partition(devices: Sequence[Device], partitions: int) -> list[int]:
    counts = [0] * partitions
    for device in devices:
        counts[partition_index(device.device_id, partitions)] += 1
    return counts


def cluster_run(
    procs: Processes, database: Database, devices: Sequence[Device], args: argparse.Namespace
) -> Run:
    cluster = LocalCluster(replicas_per_primary=args.replicas).start()
    try:
        partitions = KEYS.partitions(args.partitions)
        per_partition = devices_per_partition(devices, args.partitions)
        primaries = cluster.primaries()
        nodes = [
            Node(f"127.0.0.1:{n.port}", "primary" if n in primaries else "replica", n.client)
            for n in cluster.nodes
        ]
        by_port = {int(node.name.rpartition(":")[2]): node for node in nodes}
        for keys, devs in zip(partitions, per_partition, strict=True):
            owner = by_port[cluster.primary_for_key(keys.readings).port]
            owner.streams.append(keys.readings)
            owner.devices += devs
        run = Run("cluster", args.partitions, nodes)
        env = service_env(args, database, free_port())
        env |= {
            "REDIS_URL": cluster.url,
            "REDIS_CLUSTER": "true",
            "INGEST_PARTITIONS": str(args.partitions),
        }
        with service(procs, env, "cluster") as port:
            uvloop.run(measure(run, port, devices, args, first_seq=0))
        return run
    finally:
        cluster.stop()


def single_run(
    procs: Processes,
    database: Database,
    devices: Sequence[Device],
    args: argparse.Namespace,
    partitions: int,
) -> Run:
    if shutil.which("redis-server") is None:
        raise HarnessError("redis-server is not on PATH")
    started = []
    try:
        ports: list[int] = []
        for replica_of in [None, *([0] if args.single_replica else [])]:
            port = free_port()
            data = procs.workdir / f"redis-{port}"
            data.mkdir()
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(data),
                    "--repl-diskless-sync-delay", "0"]  # fmt: skip
            if replica_of is not None:
                argv += ["--replicaof", "127.0.0.1", str(ports[replica_of])]
            started.append(procs.start(f"redis-{port}", argv))
            ports.append(port)
        clients = [lambda p=p: redis.Redis(port=p, socket_timeout=10) for p in ports]
        wait_redis(clients, replicated=args.single_replica)
        nodes = [Node(f"127.0.0.1:{ports[0]}", "primary", clients[0])]
        nodes[0].streams = [keys.readings for keys in KEYS.partitions(partitions)]
        nodes[0].devices = len(devices)
        if args.single_replica:
            nodes.append(Node(f"127.0.0.1:{ports[1]}", "replica", clients[1]))
        run = Run(f"single, P = {partitions}", partitions, nodes)
        env = service_env(args, database, free_port())
        env |= {
            "REDIS_URL": f"redis://127.0.0.1:{ports[0]}/0",
            "INGEST_PARTITIONS": str(partitions),
        }
        with service(procs, env, "single") as port:
            uvloop.run(measure(run, port, devices, args, first_seq=0))
        return run
    finally:
        for proc in reversed(started):
            procs.stop(proc)


def wait_redis(clients: Sequence[Callable[[], redis.Redis]], *, replicated: bool) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(redis.RedisError):
            ok = all(c().ping() for c in clients)
            if ok and replicated:
                info: dict[str, Any] = clients[1]().info("replication")
                ok = info.get("master_link_status") == "up" and not info.get(
                    "master_sync_in_progress"
                )
            if ok:
                return
        if time.monotonic() > deadline:
            raise HarnessError("the single Redis did not start (or its replica did not sync)")
        time.sleep(0.05)


# --------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def within(share: float, mean: float) -> bool:
    return abs(share - mean) <= SHARE_TOLERANCE * mean


def load_line(run: Run) -> str:
    other = ", ".join(f"{k}: {v}" for k, v in sorted(run.load.other.items())) or "none"
    return (
        f"{run.name}: {run.load.accepted / run.seconds:,.0f} batches/s acked "
        f"({run.load.sent:,} sent; other answers: {other}; "
        f"the machine busy {run.busy_pct:.0f} % of a core)"
    )


def report(cluster: Run, singles: Sequence[Run], args: argparse.Namespace) -> tuple[str, bool]:
    """The markdown tables, and whether every primary's shares passed."""
    lines: list[str] = []
    ok = True
    primaries = cluster.primaries
    n = len(primaries)
    mean = 1 / n
    cpu, entries, batches = cluster.totals()
    devices = sum(p.devices for p in primaries)
    single = singles[0]  # P = 1: the baseline
    single_us = single.us_per_batch()
    lines += [
        f"{args.devices} devices over {args.connections} HTTP keep-alive connections, "
        f"{args.samples} samples per batch, {args.warmup:g} s warm-up, "
        f"{args.seconds:g} s measured per run; ACK_MODE={args.ack_mode}. "
        f"Cluster: {n} primaries + {len(cluster.nodes) - n} replicas, "
        f"INGEST_PARTITIONS={cluster.partitions}. Single: one redis-server"
        f"{' with a replica' if args.single_replica else ' without a replica'}.",
        "",
        "Load: " + "; ".join(load_line(r) for r in (cluster, *singles)) + ".",
        "",
        f"### Spread over the primaries (each share within ±{SHARE_TOLERANCE:.0%} of the mean "
        f"{pct(mean)})",
        "",
        "| primary | partitions | devices | batches stored | batch share | Redis CPU s "
        "| CPU share | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in primaries:
        b_share = p.batches / batches if batches else 0.0
        c_share = p.cpu_s / cpu if cpu else 0.0
        good = within(b_share, mean) and within(c_share, mean)
        ok &= good
        lines.append(
            f"| {p.name} | {len(p.streams)} | {p.devices} ({pct(p.devices / devices)}) "
            f"| {p.batches:,} | {pct(b_share)} | {p.cpu_s:.2f} | {pct(c_share)} "
            f"| {'PASS' if good else 'FAIL'} |"
        )
    replicas = [r for r in cluster.nodes if r.role == "replica"]
    if replicas:
        lines += [
            "",
            "Replicas' Redis CPU s over the window (not in the shares): "
            + ", ".join(f"{r.name} {r.cpu_s:.2f}" for r in replicas)
            + ".",
        ]
    lines += [
        "",
        "### Redis CPU per batch: each shard against a single Redis",
        "",
        "| Redis | P | entries (writes) | batches | batches per write | Redis CPU s "
        "| idle CPU s | CPU µs per batch | over single, P = 1 | less idle: µs per batch "
        "| over single | EXEC µs per batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    single_net = (
        (single.totals()[0] - single.idle_cpu_s()) / single.totals()[2] * 1e6
        if single.totals()[2]
        else None
    )

    def row(label: str, p: int, e: int, b: int, c: float, idle: float, ex: float) -> str:
        if not b or single_us is None or single_net is None:
            return (
                f"| {label} | {p} | {e:,} | {b:,} | - | {c:.2f} | {idle:.2f} | - | - | - | - | - |"
            )
        us, net = c / b * 1e6, (c - idle) / b * 1e6
        return (
            f"| {label} | {p} | {e:,} | {b:,} | {b / e:.2f} | {c:.2f} | {idle:.2f} | {us:.1f} "
            f"| {us / single_us:.2f} | {net:.1f} | {net / single_net:.2f} | {ex / b * 1e6:.1f} |"
        )

    for p in primaries:
        lines.append(
            row(
                f"shard {p.name}",
                *(len(p.streams), p.entries, p.batches, p.cpu_s, p.idle_cpu_s, p.exec_s),
            )
        )
    lines.append(
        row(
            "all shards",
            *(cluster.partitions, entries, batches, cpu, cluster.idle_cpu_s(), cluster.exec_s()),
        )
    )
    for r in singles:
        c, e, b = r.totals()
        lines.append(row(r.name, r.partitions, e, b, c, r.idle_cpu_s(), r.exec_s()))
    for r in singles:
        if r.nodes[1:]:
            lines.append(f"\n{r.name}: its replica used {r.nodes[1].cpu_s:.2f} CPU s.")
    worst = max((p.us_per_batch or 0.0) for p in primaries)
    if worst and entries:
        capacity = args.budget * 1e6 / worst
        shards = math.ceil(TARGET_DEVICES / capacity)
        lines += [
            "",
            "### Projected capacity",
            "",
            f"One shard at {args.budget:g} of a core, at the costliest shard's "
            f"{worst:.1f} µs per batch: {capacity:,.0f} batches/s; "
            f"{TARGET_DEVICES:,} devices at one batch a second: "
            f"ceil({TARGET_DEVICES:,} / {capacity:,.0f}) = **{shards} primaries** "
            f"(at {batches / entries:.2f} batches per write; fuller writes cost less per batch).",
        ]
    lines += ["", f"Spread: {'PASS' if ok else 'FAIL'}"]
    return "\n".join(lines), ok


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    version = next((w[2:] for w in redis_version if w.startswith("v=")), "?")
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, Redis {version}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=12, help="INGEST_PARTITIONS on the cluster")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before each window")
    p.add_argument(
        "--idle", type=float, default=3.0, help="seconds of no load measured before each run"
    )
    p.add_argument("--connections", type=int, default=128, help="HTTP keep-alive connections")
    p.add_argument("--samples", type=int, default=50, help="PPG samples per batch")
    p.add_argument("--ack-mode", choices=("primary", "replicated"), default="primary")
    p.add_argument("--replicas", type=int, default=1, help="replicas per cluster primary")
    p.add_argument("--budget", type=float, default=0.7, help="cores of one shard for ingestion")
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="an existing Postgres to create the throwaway database in",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The single Redis replicates as each cluster primary does: the same work per write.
    args.single_replica = args.replicas > 0
    with workspace() as workdir:
        procs = Processes(workdir)
        database: Database | None = None
        try:
            database = prepare_database(procs, workdir, args.database_url)
            print(f"cluster bench: registering {args.devices} devices", file=sys.stderr)
            devices = asyncio.run(register(database.url, args.devices))
            print("cluster bench: cluster run", file=sys.stderr, flush=True)
            clustered = cluster_run(procs, database, devices, args)
            singles = []
            for partitions in dict.fromkeys((1, args.partitions)):
                print(f"cluster bench: single Redis, P = {partitions}", file=sys.stderr)
                singles.append(single_run(procs, database, devices, args, partitions))
        except HarnessError as e:
            print(f"cluster bench: {e}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
            if database is not None:
                with contextlib.suppress(psycopg.Error):
                    database.drop()
    text, ok = report(clustered, singles, args)
    print(f"## Redis Cluster: spread and per-shard cost\n\nMachine: {machine()}\n\n{text}")
    problems = [r.load.other for r in (clustered, *singles) if r.load.other]
    return 0 if ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
