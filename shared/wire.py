"""The device batch format, validated strictly at decode time.

Limits here are part of the public contract (README, "Ingestion API"). Every batch they let
through can be stored as decoded: they are the bounds of the ``readings`` columns
(``shared/devices.py``) or tighter, so nothing acknowledged is refused by Postgres later.

- ``seq``, ``ts``: ``bigint``, far inside it (``ts`` becomes a ``timestamptz``).
- ``rate_hz``, ``hr``, ``spo2``: ``real`` (float4). The worker copies the decoded double,
  which Postgres rounds to a real; it refuses a nonzero value that rounds to 0 there, so
  these must be 0 or above ``REAL_UNDERFLOW`` (half the smallest positive real, 2**-150).
  The top of the real range (3.4028235e38) is far above every bound here.
- ``ppg``: ``double precision[]``, which holds every double a sample can decode to. The
  samples are copied as the device wrote them; a text that underflows a double (``1e-400``)
  decodes to 0 here, and the worker stores 0 for it (``worker/persist.py``), as Postgres
  would refuse the text itself.
- ``device_id``: ASCII letters, digits and ``._:-``, so no NUL, no newline, nothing COPY
  would have to escape.

JSON has no NaN or infinity, and a number too large for a double is refused as out of range.
``seq`` and ``ts`` are integers as JSON Schema reads them: ``7.0`` is 7, ``7.5`` is refused.
"""

import re
from typing import Annotated, Any, TypeVar

import msgspec

__all__ = (
    "DEVICE_ID_PATTERN",
    "MAX_SAMPLES",
    "REAL_UNDERFLOW",
    "BatchError",
    "PpgBatch",
    "StoredBatch",
    "decode_batch",
    "decode_stored_batch",
    "stored_samples",
)

MAX_SAMPLES = 4096
MAX_SEQ = 2**53 - 1  # exact in doubles and in JavaScript clients
TS_MIN_MS = 946_684_800_000  # 2000-01-01
TS_MAX_MS = 4_102_444_800_000  # 2100-01-01
# Python's ``$`` (msgspec checks with re.search) also matches before a final newline; the
# lookahead rules that out, in JavaScript's regular expressions (the JSON Schema's) as well.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}(?!\n)$"
# A nonzero double at or below this rounds to 0 as a Postgres real, which then refuses it.
REAL_UNDERFLOW = 2.0**-150  # 7.006492321624085e-46
# Vitals are 0 or above REAL_UNDERFLOW; the JSON Schema says so as well.
_NOT_UNDERFLOWING = {"not": {"exclusiveMinimum": 0, "maximum": REAL_UNDERFLOW}}

DeviceId = Annotated[str, msgspec.Meta(pattern=DEVICE_ID_PATTERN)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Timestamp = Annotated[int, msgspec.Meta(ge=TS_MIN_MS, le=TS_MAX_MS)]
RateHz = Annotated[float, msgspec.Meta(gt=REAL_UNDERFLOW, le=10_000)]
HeartRate = Annotated[float, msgspec.Meta(ge=0, le=400, extra_json_schema=_NOT_UNDERFLOWING)]
Spo2 = Annotated[float, msgspec.Meta(ge=0, le=100, extra_json_schema=_NOT_UNDERFLOWING)]
Sample = Annotated[float, msgspec.Meta(ge=-1e9, le=1e9)]


class PpgBatch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    device_id: DeviceId
    seq: Seq
    ts: Timestamp
    rate_hz: RateHz
    ppg: Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    hr: HeartRate | None = None
    spo2: Spo2 | None = None


class StoredBatch(msgspec.Struct, gc=False):
    """A batch as the worker reads it from the readings stream: the same fields and bounds,
    but the samples kept as the raw JSON array (they go to Postgres without being parsed;
    ``stored_samples`` checks its shape and counts them).

    Unknown fields are ignored, so the service may add some.
    """

    device_id: DeviceId
    seq: Seq
    ts: Timestamp
    rate_hz: RateHz
    ppg: msgspec.Raw
    hr: HeartRate | None = None
    spo2: Spo2 | None = None


class _WholeNumbers(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """``PpgBatch`` with ``seq`` and ``ts`` taken as any JSON number. JSON has one number type
    and JSON Schema's ``integer`` (the OpenAPI document's) is any number without a fraction,
    so ``7.0`` and ``7e0`` are the integer 7. Decoded only after ``PpgBatch`` refused a float
    there, so batches written with plain integers pay nothing for it."""

    device_id: DeviceId
    seq: Seq | Annotated[float, msgspec.Meta(ge=0, le=MAX_SEQ)]
    ts: Timestamp | Annotated[float, msgspec.Meta(ge=TS_MIN_MS, le=TS_MAX_MS)]
    rate_hz: RateHz
    ppg: Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    hr: HeartRate | None = None
    spo2: Spo2 | None = None


class _StoredWholeNumbers(msgspec.Struct, gc=False):
    """``StoredBatch`` as ``_WholeNumbers`` is ``PpgBatch``: a readings entry's ``seq`` or ``ts``
    written as a whole float by the device is the integer it stands for."""

    device_id: DeviceId
    seq: Seq | Annotated[float, msgspec.Meta(ge=0, le=MAX_SEQ)]
    ts: Timestamp | Annotated[float, msgspec.Meta(ge=TS_MIN_MS, le=TS_MAX_MS)]
    rate_hz: RateHz
    ppg: msgspec.Raw
    hr: HeartRate | None = None
    spo2: Spo2 | None = None


class BatchError(ValueError):
    """A batch that cannot be accepted: ``malformed`` (not JSON) or ``invalid`` (a bad field)."""

    def __init__(self, kind: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field

    @property
    def details(self) -> dict[str, Any] | None:
        return None if self.field is None else {"field": self.field}


# What a raw ``ppg`` array may hold: numbers, commas, brackets and JSON whitespace.
_NUMBER_ARRAY_CHARS = b"0123456789+-.eE,[] \t\r\n"

_decoder = msgspec.json.Decoder(PpgBatch)
_stored_decoder = msgspec.json.Decoder(StoredBatch)
_whole_decoder = msgspec.json.Decoder(_WholeNumbers)
_stored_whole_decoder = msgspec.json.Decoder(_StoredWholeNumbers)
_WHOLE_FIELDS = ("seq", "ts")
_Batch = TypeVar("_Batch", PpgBatch, StoredBatch)
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED_FIELD = re.compile(r"field `(?P<name>[^`]+)`")


def _field_of(message: str) -> tuple[str, str]:
    """Split msgspec's message into (reason, field path); the root is ``$``."""
    at = _AT_PATH.search(message)
    if at is not None:
        return message[: at.start()], at.group("path") or "$"
    named = _NAMED_FIELD.search(message)
    if named is not None:
        return message, named.group("name")
    return message, "$"


def _underflowing(field: str, value: float) -> BatchError:
    return BatchError(
        "invalid",
        f"invalid field {field}: Expected `float` that is 0 or > {REAL_UNDERFLOW!r}"
        f" (a real rounds {value!r} to 0)",
        field,
    )


def _invalid(e: msgspec.ValidationError) -> BatchError:
    reason, field = _field_of(str(e))
    return BatchError("invalid", f"invalid field {field}: {reason}", field)


def _malformed(e: msgspec.DecodeError) -> BatchError:
    return BatchError("malformed", f"body is not valid JSON: {e}", None)


def _float_for_integer(e: msgspec.ValidationError) -> bool:
    """Whether msgspec refused a float where ``seq`` or ``ts`` wants an integer."""
    reason, field = _field_of(str(e))
    return field in _WHOLE_FIELDS and reason.endswith("got `float`")


def _whole(value: int | float, field: str) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise BatchError(
                "invalid", f"invalid field {field}: Expected `int`, got `float`", field
            )
        return int(value)
    return value


def _whole_numbers(
    decoder: "msgspec.json.Decoder[Any]", body: bytes | str, batch_type: type[_Batch]
) -> _Batch:
    """``body`` by the lenient ``decoder``, as ``batch_type`` with ``seq`` and ``ts`` integers."""
    try:
        whole = decoder.decode(body)
    except msgspec.ValidationError as e:
        raise _invalid(e) from e
    fields = msgspec.structs.asdict(whole)
    fields["seq"] = _whole(whole.seq, "seq")
    fields["ts"] = _whole(whole.ts, "ts")
    return batch_type(**fields)


def _check_vitals(batch: PpgBatch | StoredBatch) -> None:
    """What the Meta bounds cannot say: 0 is fine, a tiny nonzero value is not."""
    hr = batch.hr
    if hr is not None and 0.0 < hr <= REAL_UNDERFLOW:
        raise _underflowing("hr", hr)
    spo2 = batch.spo2
    if spo2 is not None and 0.0 < spo2 <= REAL_UNDERFLOW:
        raise _underflowing("spo2", spo2)


def decode_batch(body: bytes | str) -> PpgBatch:
    """The batch a device sent; ``BatchError`` says why it is refused."""
    try:
        batch = _decoder.decode(body)
    except msgspec.ValidationError as e:
        if not _float_for_integer(e):
            raise _invalid(e) from e
        batch = _whole_numbers(_whole_decoder, body, PpgBatch)
    except msgspec.DecodeError as e:
        raise _malformed(e) from e
    _check_vitals(batch)
    return batch


def decode_stored_batch(body: bytes | str) -> StoredBatch:
    """A readings entry's batch, as the worker reads it; ``BatchError`` if it is not one
    ``decode_batch`` would accept (the samples aside, which it does not parse)."""
    try:
        batch = _stored_decoder.decode(body)
    except msgspec.ValidationError as e:
        if not _float_for_integer(e):
            raise _invalid(e) from e
        batch = _whole_numbers(_stored_whole_decoder, body, StoredBatch)
    except msgspec.DecodeError as e:
        raise _malformed(e) from e
    _check_vitals(batch)
    return batch


def stored_samples(ppg: bytes) -> int:
    """How many samples a stored batch's raw ``ppg`` holds; ``BatchError`` unless it is a
    flat, non-empty JSON array of numbers, at most ``MAX_SAMPLES`` of them, as ``PpgBatch``
    requires (the samples' bounds aside: the array is not parsed)."""
    if (
        ppg[:1] != b"["
        or ppg.count(b"[") != 1
        or ppg.translate(None, _NUMBER_ARRAY_CHARS)
        or not ppg.translate(None, b"[], \t\r\n")
    ):
        raise BatchError("invalid", "ppg is not a non-empty array of numbers", "ppg")
    samples = ppg.count(b",") + 1
    if samples > MAX_SAMPLES:
        raise BatchError("invalid", f"ppg has {samples} samples, more than {MAX_SAMPLES}", "ppg")
    return samples
