"""The per-partition backlog as the dashboard words it and the exposition orders it."""

from sidecar.dashboard import partitions_line
from sidecar.metrics import partition_order


def test_the_line_names_the_count_the_largest_backlog_and_its_partition() -> None:
    backlog = {"0/4": 120, "1/4": 3, "2/4": 45_000, "3/4": 0}

    assert partitions_line(backlog) == "4 · largest backlog 45,000 entries on 2/4"


def test_a_tie_names_the_first_partition_and_an_empty_backlog_says_so() -> None:
    assert partitions_line({"10/12": 7, "2/12": 7, "0/12": 1}) == (
        "3 · largest backlog 7 entries on 2/12"
    )
    assert partitions_line({"0/2": 0, "1/2": 0}) == "2 · no backlog"
    assert partitions_line({"0/1": 12}) == "1 · largest backlog 12 entries on 0/1"


def test_partitions_sort_by_count_then_index_and_odd_names_last() -> None:
    names = ["10/12", "odd", "2/12", "0/1", "1/12", "x/12", "0/12"]

    ordered = [name for name, _ in sorted(((n, 0) for n in names), key=partition_order)]

    assert ordered == ["0/1", "0/12", "1/12", "2/12", "10/12", "odd", "x/12"]
