"""What one rate-limit decision costs outside the write path, and what a slow Redis adds.

Run from the repository root, pinned to one core (Redis and the delaying proxy go to the
other one):

    taskset -c 0 .venv/bin/python bench/ratelimit.py [--decisions 3000] [--delay-ms 1]

Rows: the per-process fallback limiter (the baseline: the same GCRA with no Redis), the
shared limiter against Redis directly, and through a proxy that holds every reply from
Redis for ``--delay-ms`` (a slow or distant Redis). For each: CPU per decision in this
process, and the latency of one decision awaited alone (p50/p99) and the throughput with 64
decisions in flight. Ingestion does not pay any of this: its check rides in the write's
own Lua call (measured by ``make bench``). Prints a markdown table.
"""

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from service.ratelimit import LocalLimiter, Policy, RateLimiter, Window
from shared.keys import Keys

POLICY = Policy("api", (Window("default", 10_000_000, 60), Window("burst", 1_000_000, 1)))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DelayingProxy:
    """Forwards to Redis at once; holds each reply chunk ``delay`` seconds, in order."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.port = 0

    async def serve(self, port: int) -> None:
        server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        loop = asyncio.get_running_loop()

        async def to_redis() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                loop.call_later(self.delay, writer.write, data)

        await asyncio.gather(to_redis(), to_client(), return_exceptions=True)


async def measure(decide: Callable[[str], Awaitable[object]], decisions: int) -> dict[str, float]:
    for i in range(200):  # warm-up (script load, connections)
        await decide(f"warm-{i % 50}")
    latencies = []
    cpu0 = time.process_time()
    for i in range(decisions):
        started = time.perf_counter()
        await decide(f"10.0.{i % 250}.{i % 7}")
        latencies.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu0) / decisions
    latencies.sort()

    in_flight = 64
    started = time.perf_counter()
    per_task = decisions // in_flight

    async def worker(n: int) -> None:
        for i in range(per_task):
            await decide(f"10.1.{n}.{i % 13}")

    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    rate = per_task * in_flight / (time.perf_counter() - started)
    return {
        "cpu_us": cpu * 1e6,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "per_s": rate,
    }


def pinned(argv: list[str]) -> list[str]:
    """On the other core, when there is one: their work is not charged to the limiter."""
    return ["taskset", "-c", "1", *argv] if (os.cpu_count() or 1) > 1 else argv


async def ready(client: Redis) -> None:
    for _ in range(200):
        try:
            await client.ping()
            return
        except OSError:
            await asyncio.sleep(0.05)


async def run(args: argparse.Namespace, redis_port: int, proxy_port: int) -> None:
    direct, slow = Redis(port=redis_port), Redis(port=proxy_port)
    await ready(direct)
    await ready(slow)
    keys = Keys("bench:")
    local = LocalLimiter()

    async def local_decide(key: str) -> object:
        return local.check(POLICY, key)

    shared = RateLimiter(direct, keys, fail_closed=False, timeout=5)
    delayed = RateLimiter(slow, keys, fail_closed=False, timeout=5)
    rows = [
        ("per-process (fallback; baseline)", await measure(local_decide, args.decisions)),
        ("shared, Redis direct", await measure(lambda k: shared.check(POLICY, k), args.decisions)),
        (
            f"shared, Redis +{args.delay_ms:g} ms",
            await measure(lambda k: delayed.check(POLICY, k), args.decisions),
        ),
    ]
    await direct.aclose()
    await slow.aclose()

    print(f"Rate-limit decisions, policy with two windows; {args.decisions} decisions per row.\n")
    print(
        "| limiter | µs CPU / decision | p50 ms (alone) | p99 ms (alone) "
        "| decisions/s (64 in flight) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        print(
            f"| {name} | {r['cpu_us']:.1f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
            f"| {r['per_s']:,.0f} |"
        )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--proxy":
        upstream, port, delay_ms = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        asyncio.run(DelayingProxy(upstream, delay_ms / 1000).serve(port))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--delay-ms", type=float, default=1.0)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH")
    redis_port, proxy_port = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="pulsecal-ratelimit-")
    redis = subprocess.Popen(
        pinned(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]),
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    delay = str(args.delay_ms)
    proxy = subprocess.Popen(
        pinned([sys.executable, __file__, "--proxy", str(redis_port), str(proxy_port), delay])
    )
    try:
        import uvloop

        uvloop.run(run(args, redis_port, proxy_port))
    finally:
        for child in (proxy, redis):
            child.terminate()
            child.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
