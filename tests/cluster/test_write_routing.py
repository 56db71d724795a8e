"""The write connection on a real Redis Cluster: it finds its partition's primary from any
seed, follows ``ASK`` while the partition's slot migrates and ``MOVED`` once it has, and the
device's state moves with the slot (a retry is still a duplicate on the new node)."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from redis.crc import key_slot

from service.fastpath.cluster import Address, SlotMap
from service.fastpath.resp import RespConnection, cluster_slots
from service.store import DUPLICATE, STORED, WRITE_CONNECTION_SETUP, ReadingsWriter
from shared.keys import Keys
from shared.tasks import cancel_and_wait
from tests.support.cluster import ClusterNode, LocalCluster

PARTITION = Keys("routing:").partitions(3)[1]


def payload(seq: int) -> bytes:
    return msgspec.json.encode({"device_id": "dev-r", "seq": seq, "ts": seq, "ppg": [0.5]})


def node_id(cluster: LocalCluster, node: ClusterNode) -> str:
    reply = cluster.command(node, "CLUSTER", "MYID")
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def stream_length_on(cluster: LocalCluster, node: ClusterNode, stream: str) -> int:
    """XLEN on ``node`` itself (ASKING lets it answer for a slot it is importing)."""
    client = node.client()
    try:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.xlen(stream)
        return int(pipe.execute()[1])
    finally:
        client.close()


@pytest.fixture
def moved_back(cluster: LocalCluster) -> Iterator[list[tuple[ClusterNode, ClusterNode]]]:
    """Slots a test moves are given back to their primary after it (later tests count on
    the even slicing)."""
    moves: list[tuple[ClusterNode, ClusterNode]] = []
    yield moves
    slot = key_slot(PARTITION.readings.encode())
    for source, target in reversed(moves):
        migrate_slot(cluster, target, source, slot)
        finish_migration(cluster, source, slot)
    cluster.wait_ok()


def migrate_slot(
    cluster: LocalCluster, source: ClusterNode, target: ClusterNode, slot: int
) -> None:
    """The first half of a slot migration: every key of the slot moved to ``target``."""
    cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(cluster, source))
    cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(cluster, target))
    keys = cluster.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
    if keys:
        host, port = target.address.rsplit(":", 1)
        cluster.command(source, "MIGRATE", host, int(port), "", 0, 5000, "KEYS", *keys)


def finish_migration(cluster: LocalCluster, target: ClusterNode, slot: int) -> None:
    """The slot is ``target``'s, on every primary."""
    owner = node_id(cluster, target)
    for node in cluster.primaries():
        cluster.command(node, "CLUSTER", "SETSLOT", slot, "NODE", owner)


@pytest.fixture
async def writer(cluster: LocalCluster) -> AsyncIterator[tuple[ReadingsWriter, RespConnection]]:
    slot = key_slot(PARTITION.readings.encode())
    # Seeded with a node that does not serve the slot.
    seed = next(n for n in cluster.primaries() if n != cluster.primary_for_slot(slot))
    host, port = seed.address.rsplit(":", 1)

    async def query(address: Address) -> list[Any]:
        return await cluster_slots(seed.url, address, connect_timeout=2.0)

    slots = SlotMap([(host, int(port))], query=query)
    connection = RespConnection(
        seed.url, connect_timeout=2.0, setup=WRITE_CONNECTION_SETUP, slots=slots, slot=slot
    )
    writer = ReadingsWriter(
        connection,
        PARTITION,
        max_batch=16,
        max_pending=1000,
        max_in_flight=2,
        timeout=2.0,
        idempotency_window=128,
        idempotency_ttl=3600,
    )
    task = asyncio.create_task(writer.run())
    yield writer, connection
    await cancel_and_wait([task])
    connection.close()


async def test_the_write_follows_its_slot_from_any_seed_through_ask_and_moved(
    cluster: LocalCluster,
    writer: tuple[ReadingsWriter, RespConnection],
    moved_back: list[tuple[ClusterNode, ClusterNode]],
) -> None:
    write, connection = writer
    stream = PARTITION.readings
    slot = key_slot(stream.encode())
    source = cluster.primary_for_slot(slot)
    target = next(n for n in cluster.primaries() if n != source)

    assert (await write.submit("dev-r", 0, payload(0))).stored == STORED
    assert f"{connection.address[0]}:{connection.address[1]}" == source.address
    assert stream_length_on(cluster, source, stream) == 1

    # Mid-migration, with the partition's keys already on the target: ASK.
    moved_back.append((source, target))
    await asyncio.to_thread(migrate_slot, cluster, source, target, slot)
    assert (await write.submit("dev-r", 1, payload(1))).stored == STORED
    assert connection.asked == 1
    assert stream_length_on(cluster, target, stream) == 2
    # The device's state moved with the slot: a retry is a duplicate there.
    assert (await write.submit("dev-r", 1, payload(1))).stored == DUPLICATE

    # The slot is the target's now: MOVED, and the connection goes there.
    await asyncio.to_thread(finish_migration, cluster, target, slot)
    assert (await write.submit("dev-r", 2, payload(2))).stored == STORED
    assert connection.moved >= 1
    assert f"{connection.address[0]}:{connection.address[1]}" == target.address
    assert stream_length_on(cluster, target, stream) == 3
    assert write.failed == 0
