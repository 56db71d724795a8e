"""A stored batch's samples, checked without being parsed: the shapes ``PpgBatch`` accepts
are counted, any other is refused as the batch's invalid ``ppg``."""

import pytest

from shared.wire import MAX_SAMPLES, BatchError, stored_samples


@pytest.mark.parametrize(
    ("ppg", "samples"),
    [
        (b"[0.5]", 1),
        (b"[0.5,0.6,-7]", 3),
        (b"[ 1e-3 ,\n2E+4,\t-0.0 ]", 3),
        (b"[" + b",".join([b"1"] * MAX_SAMPLES) + b"]", MAX_SAMPLES),
    ],
    ids=["one", "several", "whitespace-and-exponents", "most"],
)
def test_a_flat_array_of_numbers_is_counted(ppg: bytes, samples: int) -> None:
    assert stored_samples(ppg) == samples


@pytest.mark.parametrize(
    ("ppg", "message"),
    [
        (b"[]", "ppg is not a non-empty array of numbers"),
        (b"[ ]", "ppg is not a non-empty array of numbers"),
        (b"[[1],[2]]", "ppg is not a non-empty array of numbers"),
        (b'["1"]', "ppg is not a non-empty array of numbers"),
        (b"[null]", "ppg is not a non-empty array of numbers"),
        (b"{}", "ppg is not a non-empty array of numbers"),
        (b"1", "ppg is not a non-empty array of numbers"),
        (
            b"[" + b",".join([b"1"] * (MAX_SAMPLES + 1)) + b"]",
            f"ppg has {MAX_SAMPLES + 1} samples, more than {MAX_SAMPLES}",
        ),
    ],
    ids=["empty", "blank", "nested", "strings", "null", "object", "number", "too-many"],
)
def test_anything_else_is_an_invalid_ppg(ppg: bytes, message: str) -> None:
    with pytest.raises(BatchError) as refused:
        stored_samples(ppg)

    assert (refused.value.kind, refused.value.field, refused.value.message) == (
        "invalid",
        "ppg",
        message,
    )
