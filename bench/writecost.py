"""What a stored batch costs Redis: the service's write, its parts, and the write it replaced.

Run from the repository root, pinned to one core (the throwaway redis-server goes to the
other one):

    taskset -c 0 .venv/bin/python bench/writecost.py [--seconds 5] [--payload 1100] [--batch 16]
        [--cluster]

Each row drives one fresh Redis with 8 writes in flight of ``--batch`` batches each (the
service's group commit sends up to WRITE_MAX_BATCH per write under load), from 128 devices
per write in flight, each sending its next seq, and reads Redis's own CPU time from /proc,
so the figure is Redis CPU per batch stored, whatever this process costs. CPU time on a
shared machine varies from run to run by a fifth or more (run it several times and take
the median); ``--instructions`` counts the instructions Redis executes per batch instead
(under valgrind's callgrind, after a warm-up, over ``--steps`` writes per write in
flight): repeatable to a few tenths of a percent, so it shows what a change to one write
does; it does not compare rows as CPU time does, since it leaves out the kernel's time
(page faults as the stream grows, the network) and what cache misses cost. The rows:

- ``write``: the service's write (``service/store.py``): ``MULTI``, the ``XADD`` of one entry
  carrying the write's batches, the script deciding each batch's rate limit and idempotency
  from the devices' state records, ``EXEC``; ``write, no rate limit``: the same without an
  ingest policy;
- ``XADD of the entry alone``: the same entry, added by a plain ``XADD``: what storing the
  payloads costs, the floor of any write that keeps them in a stream;
- ``previous write``: the write this one replaced (``bench/previous_write.lua``, kept as it
  was): one Lua call per write adding one entry per batch, with a GCRA key per device and
  window and a sorted set of seqs per device, the payloads passed through Lua.

``--cluster`` adds ``write, cluster mode`` right after ``write``: the same write, the same keys
and load, on a redis-server started with ``--cluster-enabled yes`` and given every slot (a
one-node cluster), so the two rows differ by cluster mode alone, not by more processes or
fewer batches per write (what ``bench/cluster.py``'s per-shard figure also carries).

Prints a markdown table.
"""

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio
import uvloop

from service.fastpath.resp import RespConnection, encode_command
from service.ratelimit import Policy, Window
from service.store import WRITE_CONNECTION_SETUP, ReadingsWriter
from shared.keys import Keys

IN_FLIGHT = 8
DEVICES = 128  # per write in flight
POLICY = Policy("ingest", (Window("minute", 10_000_000, 60.0),), key="device")
PREVIOUS_WRITE = (Path(__file__).parent / "previous_write.lua").read_bytes()
KEYS = Keys("bench:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def instructions(pid: int) -> int:
    """The instructions a redis-server under callgrind has executed since it was zeroed."""
    out = subprocess.run(
        ["callgrind_control", "-e", "Ir", str(pid)], capture_output=True, text=True, check=True
    ).stdout
    return sum(int(m.replace(",", "")) for m in re.findall(r"Th \d+\s+([\d,]+)", out))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(argv: list[str]) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# Set by --instructions: count instructions (callgrind) rather than CPU time.
COUNT_INSTRUCTIONS = False
STEPS = 100


async def serve_every_slot(client: "redis.asyncio.Redis") -> None:
    """Make a redis-server in cluster mode a one-node cluster: every slot its own."""
    await client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    while True:
        info = (await client.execute_command("CLUSTER", "INFO")).decode()
        if "cluster_state:ok" in info:
            return
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def redis_server(*, cluster: bool = False) -> AsyncIterator[tuple[int, int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("writecost: redis-server is not on PATH")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with tempfile.TemporaryDirectory() as scratch:
        if cluster:
            # The bus port named, as the default (port + 10000) may be past 65535.
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", f"{scratch}/nodes.conf"]
            argv += ["--cluster-port", str(free_port())]
        if COUNT_INSTRUCTIONS:
            if shutil.which("valgrind") is None:
                sys.exit("writecost: --instructions needs valgrind")
            out = f"--callgrind-out-file={scratch}/callgrind.out"
            argv = ["valgrind", "--tool=callgrind", out, *argv]
        elif shutil.which("taskset"):
            argv = ["taskset", "-c", "1", *argv]
        proc = start(argv)
        try:
            client = redis.asyncio.Redis(port=port)
            try:
                async with asyncio.timeout(30):
                    while True:
                        try:
                            await client.ping()
                            break
                        except (redis.RedisError, OSError):
                            await asyncio.sleep(0.1)
                    if cluster:
                        await serve_every_slot(client)
            finally:
                await client.aclose()
            yield port, proc.pid
        finally:
            proc.terminate()
            proc.wait()


def batches(n: int, batch: int) -> list[tuple[str, int]]:
    """The (device, seq) of write ``n``: each write in flight has DEVICES devices of its
    own, written in turn, each sending its next seq."""
    worker, k = divmod(n, 1_000_000_000)
    out = []
    for i in range(k * batch, (k + 1) * batch):
        seq, device = divmod(i, DEVICES)
        out.append((f"dev-{worker}-{device}", seq))
    return out


async def measure(
    pid: int, step: Callable[[int], Awaitable[None]], seconds: float, batch: int
) -> float:
    """Redis CPU µs (or instructions) per batch with IN_FLIGHT loops each storing ``batch``
    batches per step."""
    count = 0
    stop = False
    steps: int | None = None

    async def loop(worker: int) -> None:
        nonlocal count
        n = worker * 1_000_000_000
        while not stop and (steps is None or n - worker * 1_000_000_000 < steps):
            await step(n)
            n += 1
            count += batch

    if COUNT_INSTRUCTIONS:
        steps = STEPS // 2  # the warm-up: every device seen, the state hash in its encoding
        await asyncio.gather(*(loop(i) for i in range(IN_FLIGHT)))
        steps = STEPS // 2 + STEPS
        zero = await asyncio.create_subprocess_exec(
            "callgrind_control",
            "-z",
            str(pid),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await zero.wait()
        n0 = count
        await asyncio.gather(*(loop(i) for i in range(IN_FLIGHT)))
        return instructions(pid) / (count - n0)
    tasks = [asyncio.create_task(loop(i)) for i in range(IN_FLIGHT)]
    await asyncio.sleep(1.0)
    cpu0, n0 = cpu_seconds(pid), count
    await asyncio.sleep(seconds)
    cpu1, n1 = cpu_seconds(pid), count
    stop = True
    await asyncio.gather(*tasks)
    return (cpu1 - cpu0) / (n1 - n0) * 1e6


def writer(conn: RespConnection, batch: int, *, policy: bool) -> ReadingsWriter:
    return ReadingsWriter(
        conn,
        KEYS,
        max_batch=batch,
        max_pending=100_000,
        max_in_flight=IN_FLIGHT,
        timeout=5,
        idempotency_window=128,
        idempotency_ttl=3600,
        policy=POLICY if policy else None,
    )


async def write_row(
    payload: bytes, seconds: float, batch: int, *, policy: bool, cluster: bool = False
) -> float:
    async with redis_server(cluster=cluster) as (port, pid):
        conn = RespConnection(
            f"redis://127.0.0.1:{port}/0", connect_timeout=2, setup=WRITE_CONNECTION_SETUP
        )
        store = writer(conn, batch, policy=policy)
        runner = asyncio.create_task(store.run())

        async def step(n: int) -> None:
            futures = [store.submit(device, seq, payload) for device, seq in batches(n, batch)]
            await asyncio.gather(*futures)

        try:
            return await measure(pid, step, seconds, batch)
        finally:
            runner.cancel()
            conn.close()


async def xadd_row(payload: bytes, seconds: float, batch: int) -> float:
    """The write's own XADD, cut out of the transaction the writer builds."""
    async with redis_server() as (port, pid):
        conn = RespConnection(f"redis://127.0.0.1:{port}/0", connect_timeout=2)
        store = writer(conn, batch, policy=False)
        command = store.transaction([(device, 0, payload) for device, _ in batches(0, batch)])
        xadd = command[command.index(b"*", 1) : command.rindex(b"*", 0, command.index(b"EVALSHA"))]
        assert xadd.startswith(b"*7\r\n$4\r\nXADD"), xadd[:20]

        async def step(n: int) -> None:
            await conn.execute(xadd)

        try:
            return await measure(pid, step, seconds, batch)
        finally:
            conn.close()


async def previous_row(payload: bytes, seconds: float, batch: int) -> float:
    """The previous write: per batch its seen-set and GCRA cell as keys, and its seq,
    payload and an empty traceparent as arguments."""
    async with redis_server() as (port, pid):
        conn = RespConnection(f"redis://127.0.0.1:{port}/0", connect_timeout=2)
        sha = await conn.execute(encode_command([b"SCRIPT", b"LOAD", PREVIOUS_WRITE]))
        fixed = [b"128", b"112", b"3600", b"1700000000000", *POLICY.args]
        # Its per-device keys are gone from shared/keys.py: named here under the state
        # prefix, so in the readings stream's slot as they were.
        stream, device_prefix = KEYS.readings.encode(), KEYS.ingest_state_prefix.encode()

        async def step(n: int) -> None:
            keys, args = [stream], []
            for device, seq in batches(n, batch):
                keys += [device_prefix + b"seen:" + device.encode()]
                keys += [device_prefix + b"rl:ingest:minute:" + device.encode()]
                args += [b"%d" % seq, payload, b""]
            await conn.execute(
                encode_command([b"EVALSHA", sha, b"%d" % len(keys), *keys, *fixed, *args])
            )

        try:
            return await measure(pid, step, seconds, batch)
        finally:
            conn.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    p.add_argument("--payload", type=int, default=1100, help="bytes per batch")
    p.add_argument("--batch", type=int, default=16, help="batches per write")
    p.add_argument(
        "--instructions",
        action="store_true",
        help="count Redis's instructions per batch (valgrind's callgrind), not its CPU time",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="add the write on a one-node Redis Cluster (every slot), after the plain write",
    )
    p.add_argument(
        "--steps", type=int, default=100, help="writes per write in flight with --instructions"
    )
    args = p.parse_args()
    global COUNT_INSTRUCTIONS, STEPS
    COUNT_INSTRUCTIONS, STEPS = args.instructions, args.steps
    payload = b'{"ppg":[' + b"1" * max(0, args.payload - 10) + b"]}"
    secs, batch = args.seconds, args.batch
    rows = [
        ("write (service/store.py)", write_row(payload, secs, batch, policy=True)),
        *(
            [("write, cluster mode", write_row(payload, secs, batch, policy=True, cluster=True))]
            if args.cluster
            else []
        ),
        ("write, no rate limit", write_row(payload, secs, batch, policy=False)),
        ("XADD of the entry alone", xadd_row(payload, secs, batch)),
        ("previous write (bench/previous_write.lua)", previous_row(payload, secs, batch)),
    ]
    print(f"{batch} batches of {len(payload)} bytes per write, {IN_FLIGHT} writes in flight\n")
    unit = "instructions" if COUNT_INSTRUCTIONS else "CPU µs"
    print(f"| write | Redis {unit} per batch |\n| --- | ---: |")
    for name, coro in rows:
        value = await coro
        shown = f"{value:,.0f}" if COUNT_INSTRUCTIONS else f"{value:.2f}"
        print(f"| {name} | {shown} |", flush=True)


if __name__ == "__main__":
    uvloop.run(main())
