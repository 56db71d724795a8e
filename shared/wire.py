"""The device batch format, validated strictly at decode time.

Limits here are part of the public contract (README, "Ingestion API").
"""

import re
from typing import Annotated, Any

import msgspec

__all__ = (
    "DEVICE_ID_PATTERN",
    "MAX_SAMPLES",
    "BatchError",
    "PpgBatch",
    "decode_batch",
)

MAX_SAMPLES = 4096
MAX_SEQ = 2**53 - 1  # exact in doubles and in JavaScript clients
TS_MIN_MS = 946_684_800_000  # 2000-01-01
TS_MAX_MS = 4_102_444_800_000  # 2100-01-01
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"

Sample = Annotated[float, msgspec.Meta(ge=-1e9, le=1e9)]


class PpgBatch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    device_id: Annotated[str, msgspec.Meta(pattern=DEVICE_ID_PATTERN)]
    seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    ts: Annotated[int, msgspec.Meta(ge=TS_MIN_MS, le=TS_MAX_MS)]
    rate_hz: Annotated[float, msgspec.Meta(gt=0, le=10_000)]
    ppg: Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    hr: Annotated[float, msgspec.Meta(ge=0, le=400)] | None = None
    spo2: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None


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


_decoder = msgspec.json.Decoder(PpgBatch)
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


def decode_batch(body: bytes | str) -> PpgBatch:
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as e:
        reason, field = _field_of(str(e))
        raise BatchError("invalid", f"invalid field {field}: {reason}", field) from e
    except msgspec.DecodeError as e:
        raise BatchError("malformed", f"body is not valid JSON: {e}", None) from e
