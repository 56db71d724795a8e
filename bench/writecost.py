"""What a stored WebSocket/HTTP batch costs Redis, for the write script and its alternatives.

Run from the repository root, pinned to one core (the throwaway redis-server goes to the
other one):

    taskset -c 0 .venv/bin/python bench/writecost.py [--seconds 5] [--payload 1100]

Each row drives one fresh Redis with 8 writes in flight of 16 batches each (what the
service's group commit sends under load) and reads Redis's own CPU time from /proc, so the
figure is Redis CPU per batch stored, whatever this process costs:

- ``script``: the service's write script (``service/store.py``): GCRA cell, idempotency
  set and ``XADD`` per batch, in one Lua call; ``script, no limit``: rate limiting off;
- ``script, XADD only``: the same Lua call with only the ``XADD`` left in: the floor of any
  design that passes the payloads through Lua;
- ``XADD per batch``: plain pipelined ``XADD``s, no idempotency, no limit;
- ``XADD per write``: one entry holding all 16 payloads;
- ``MULTI, script without payloads, XADD per write``: idempotency decided by a script that
  sees only the seqs, the payloads stored by a plain ``XADD`` in the same transaction (what
  storing outside Lua would cost; as written it would store a duplicate too, so it is a
  bound, not a design).

Prints a markdown table.
"""

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from service import store
from service.fastpath.resp import RespConnection, encode_command
from service.ratelimit import Policy, Window
from shared.keys import Keys
from shared.readings import BATCH_FIELD, encode_entry

BATCH = 16
IN_FLIGHT = 8
POLICY = Policy("ingest", (Window("minute", 10_000_000, 60.0),), key="device")

_SEEN_ONLY_LUA = b"""
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('ZADD', KEYS[i], 'NX', ARGV[i], ARGV[i])
end
return out
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[int, int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("writecost: redis-server is not on PATH")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "1", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait()


def script_variant(xadd_only: bool) -> None:
    """Point the writer at the service's script, or at it with all but the XADD removed."""
    lua = store._WRITE_BATCH_LUA
    if xadd_only:
        lua = lua.replace("if redis.call('ZADD', seen, 'NX', seq, seq) == 1 then", "if true then")
        trim = "local held = redis.call('ZCARD', seen)\n      if held == 1 or held > window then"
        lua = lua.replace(trim, "if false then")
    store._WRITE_BATCH_SHA = hashlib.sha1(lua.encode()).hexdigest().encode()  # noqa: S324
    store._LOAD_SCRIPT = encode_command([b"SCRIPT", b"LOAD", lua.encode()])


async def measure(pid: int, step: Callable[[int], Awaitable[None]], seconds: float) -> float:
    """Redis CPU µs per batch with IN_FLIGHT loops each storing BATCH batches per step."""
    count = 0
    stop = False

    async def loop(worker: int) -> None:
        nonlocal count
        n = worker * 1_000_000_000
        while not stop:
            n += 1
            await step(n)
            count += BATCH

    tasks = [asyncio.create_task(loop(i)) for i in range(IN_FLIGHT)]
    await asyncio.sleep(1.0)
    cpu0, n0 = cpu_seconds(pid), count
    await asyncio.sleep(seconds)
    cpu1, n1 = cpu_seconds(pid), count
    stop = True
    await asyncio.gather(*tasks)
    return (cpu1 - cpu0) / (n1 - n0) * 1e6


async def writer_row(payload: bytes, seconds: float, *, policy: bool, xadd_only: bool) -> float:
    script_variant(xadd_only)
    with redis_server() as (port, pid):
        await asyncio.sleep(0.3)
        conn = RespConnection(f"redis://127.0.0.1:{port}/0", connect_timeout=2)
        writer = store.ReadingsWriter(
            conn,
            Keys("bench:"),
            max_batch=BATCH,
            max_pending=100_000,
            max_in_flight=IN_FLIGHT,
            timeout=5,
            idempotency_window=256,
            idempotency_ttl=3600,
            policy=POLICY if policy else None,
        )
        runner = asyncio.create_task(writer.run())

        async def step(n: int) -> None:
            futures = [writer.submit(f"dev-{i:02d}", n, payload) for i in range(BATCH)]
            await asyncio.gather(*futures)

        try:
            return await measure(pid, step, seconds)
        finally:
            runner.cancel()
            conn.close()


async def raw_row(payload: bytes, seconds: float, kind: str) -> float:
    with redis_server() as (port, pid):
        await asyncio.sleep(0.3)
        conn = RespConnection(f"redis://127.0.0.1:{port}/0", connect_timeout=2)
        sha = await conn.execute(encode_command([b"SCRIPT", b"LOAD", _SEEN_ONLY_LUA]))
        entry = [part for pair in encode_entry(payload, 1_700_000_000_000).items() for part in pair]
        blob = b"\n".join([payload] * BATCH)
        seen_keys = [b"bench:seen:%02d" % i for i in range(BATCH)]

        def commands(n: int) -> list[bytes]:
            if kind == "each":
                return [encode_command([b"XADD", b"bench:r", b"*", *entry])] * BATCH
            if kind == "one":
                return [encode_command([b"XADD", b"bench:r", b"*", BATCH_FIELD, blob])]
            seqs = [b"%d" % (n * 100 + i) for i in range(BATCH)]
            script = [b"EVALSHA", sha, b"%d" % BATCH, *seen_keys, *seqs]
            return [
                encode_command([b"MULTI"]),
                encode_command(script),
                encode_command([b"XADD", b"bench:r", b"*", BATCH_FIELD, blob]),
                encode_command([b"EXEC"]),
            ]

        async def step(n: int) -> None:
            cmds = commands(n)
            # One write, its replies awaited together (what a pipeline does).
            protocol = conn._protocol
            assert protocol is not None
            waiters = [protocol.send(b"") for _ in cmds[:-1]]
            waiters.append(protocol.send(b"".join(cmds)))
            await asyncio.gather(*waiters)

        try:
            return await measure(pid, step, seconds)
        finally:
            conn.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    p.add_argument("--payload", type=int, default=1100, help="bytes per batch")
    args = p.parse_args()
    payload = b'{"ppg":[' + b"1" * max(0, args.payload - 10) + b"]}"
    secs = args.seconds
    rows = [
        (
            "script (service/store.py)",
            writer_row(payload, secs, policy=True, xadd_only=False),
        ),
        ("script, no limit", writer_row(payload, secs, policy=False, xadd_only=False)),
        ("script, XADD only", writer_row(payload, secs, policy=False, xadd_only=True)),
        ("XADD per batch", raw_row(payload, secs, "each")),
        ("XADD per write", raw_row(payload, secs, "one")),
        ("MULTI, script without payloads, XADD per write", raw_row(payload, secs, "multi")),
    ]
    print(f"{BATCH} batches of {len(payload)} bytes per write, {IN_FLIGHT} writes in flight\n")
    print("| write | Redis CPU µs per batch |\n| --- | ---: |")
    for name, coro in rows:
        print(f"| {name} | {await coro:.2f} |", flush=True)


if __name__ == "__main__":
    uvloop.run(main())
