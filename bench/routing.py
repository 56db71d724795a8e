"""What routing a batch to its partition's writer costs the service, per batch.

Run from the repository root, pinned to one core:

    taskset -c 0 .venv/bin/python bench/routing.py [--partitions 12] [--batches 200000]

``PartitionedWriter.submit_to`` (``service/partitions.py``) with one partition is the single
writer's own method, bound at construction; with several it looks the device's writer up
(a dict, filled once per device) and calls it. Both queue into real ``ReadingsWriter``s (no
Redis: nothing is flushed); the rows are the whole ``submit_to`` per batch for 1 and for
``--partitions`` partitions, and the lookup alone. Rounds alternate and the best of each is
kept. Prints a markdown table.
"""

import argparse
import asyncio
import timeit

from service.fastpath.resp import RespConnection
from service.partitions import PartitionedWriter
from service.store import ReadingsWriter, WriteResult
from shared.keys import Keys


class _Waiter:
    def done(self) -> bool:
        return False

    def set_result(self, result: WriteResult, /) -> None:
        pass

    def set_exception(self, exception: BaseException, /) -> None:
        pass


def _writer(count: int) -> PartitionedWriter:
    return PartitionedWriter(
        [
            ReadingsWriter(
                RespConnection("redis://127.0.0.1:1", connect_timeout=1.0),
                partition,
                max_batch=64,
                max_pending=1 << 40,
                max_in_flight=8,
                timeout=1.0,
                idempotency_window=128,
                idempotency_ttl=3600,
            )
            for partition in Keys().partitions(count)
        ]
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--batches", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    devices = [f"dev-{i:06d}" for i in range(1000)]
    waiter = _Waiter()
    n = args.batches
    best: dict[str, float] = {}

    def submit(writer: PartitionedWriter) -> None:
        queue = writer.submit_to
        for i in range(n):
            queue(devices[i % 1000], i, b"{}", waiter)
        for one in writer.writers:
            one._pending.clear()  # nothing flushes them here

    def lookup(writer: PartitionedWriter) -> None:
        find = writer.writer_of
        for i in range(n):
            find(devices[i % 1000])

    writers = {1: _writer(1), args.partitions: _writer(args.partitions)}
    rows = [
        ("submit_to, 1 partition", lambda: submit(writers[1])),
        (f"submit_to, {args.partitions} partitions", lambda: submit(writers[args.partitions])),
        (
            f"the lookup alone, {args.partitions} partitions",
            lambda: lookup(writers[args.partitions]),
        ),
    ]
    for _ in range(args.rounds):
        for name, run in rows:
            took = timeit.timeit(run, number=1) / n
            best[name] = min(best.get(name, took), took)
    print("| per batch | ns (best of rounds) |\n|---|---:|")
    for name, _ in rows:
        print(f"| {name} | {best[name] * 1e9:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
