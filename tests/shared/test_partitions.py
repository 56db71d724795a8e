"""The partition layout: stable, evenly placed on the slot space, and P = 1 as before."""

import collections
import zlib

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from shared.keys import Keys
from shared.partitions import MAX_PARTITIONS, layout, partition_index
from worker.partitions import assign

PINNED = [8, 2, 0, 6, 1, 7, 1, 3]


def test_one_partition_is_the_single_stream_of_before() -> None:
    keys = Keys("p:")
    (only,) = keys.partitions(1)
    assert only.partition.name == "0/1"
    assert (only.readings, only.ingest_state_prefix) == (keys.readings, keys.ingest_state_prefix)
    assert (only.readings_dead, only.readings_errors) == (keys.readings_dead, keys.readings_errors)
    assert only.readings == "p:{ingest}:readings"


@pytest.mark.parametrize("count", [2, 3, 12, 64, 256])
def test_partition_i_sits_in_the_i_th_slice_of_the_slot_space(count: int) -> None:
    for partition in Keys().partitions(count):
        slots = {
            key_slot(key.encode())
            for key in (
                partition.readings,
                partition.ingest_state_prefix + "123",
                partition.readings_dead,
                partition.readings_errors,
            )
        }
        (slot,) = slots  # every key of a partition in one slot
        index = partition.partition.index
        assert index * REDIS_CLUSTER_HASH_SLOTS // count <= slot
        assert slot < (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count


def test_a_device_s_partition_is_stable() -> None:
    # crc32 of the id, mod P: pinned, as every process and version must agree on it.
    assert [partition_index(f"dev-{i}", 12) for i in range(8)] == PINNED
    assert partition_index("device-42", 7) == zlib.crc32(b"device-42") % 7
    assert partition_index("device-42", 1) == 0


def test_devices_spread_evenly_over_the_partitions() -> None:
    counts = collections.Counter(partition_index(f"dev-{i:06d}", 12) for i in range(12_000))
    assert set(counts) == set(range(12))
    assert max(counts.values()) < 1.1 * 1000
    assert min(counts.values()) > 0.9 * 1000


def test_layout_bounds() -> None:
    assert len(layout(MAX_PARTITIONS)) == MAX_PARTITIONS
    with pytest.raises(ValueError, match="1 to"):
        layout(0)
    with pytest.raises(ValueError, match="1 to"):
        layout(MAX_PARTITIONS + 1)


@pytest.mark.parametrize(("partitions", "workers"), [(1, 1), (1, 3), (4, 2), (12, 5), (3, 7)])
def test_workers_divide_the_partitions_each_to_one(partitions: int, workers: int) -> None:
    keys = Keys()
    names = [f"pod-{i}:0000000{i}" for i in range(workers)]
    shares = {name: assign(keys.partitions(partitions), names, name) for name in names}
    owned = [p for share in shares.values() for p in share]
    assert sorted(owned, key=lambda p: p.partition.index) == list(keys.partitions(partitions))
    sizes = [len(share) for share in shares.values()]
    assert max(sizes) - min(sizes) <= 1
    # A worker not yet among the members counts itself in.
    assert assign(keys.partitions(partitions), [], "alone") == list(keys.partitions(partitions))
