"""How a variable's text becomes a value: each parser says what it accepts, in words.

The same words make the error message (``expected <accepts>``), the ``--help`` epilogs and
``docs/configuration.md``, so what is refused and what is documented cannot drift apart.
"""

import ipaddress
import math
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

__all__ = (
    "POLICIES",
    "Boolean",
    "Choice",
    "FieldNames",
    "FloatRange",
    "IntRange",
    "IpNetwork",
    "KeyPrefix",
    "Networks",
    "OrNone",
    "Parser",
    "PolicyNames",
    "Text",
    "Url",
)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The rate-limit policies RATE_LIMIT_SHADOW may name.
POLICIES = ("api", "ingest")


class Parser(Protocol[T_co]):
    """Turns a variable's text into its value; raises ``ValueError("expected " + accepts)``."""

    @property
    def accepts(self) -> str: ...

    def __call__(self, raw: str, /) -> T_co: ...


def _refuse(accepts: str) -> ValueError:
    return ValueError(f"expected {accepts}")


@dataclass(frozen=True, slots=True)
class Boolean:
    accepts = "true or false"

    def __call__(self, raw: str, /) -> bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise _refuse(self.accepts)


@dataclass(frozen=True, slots=True)
class IntRange:
    lo: int
    hi: int

    @property
    def accepts(self) -> str:
        return f"an integer in [{self.lo}, {self.hi}]"

    def __call__(self, raw: str, /) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise _refuse(self.accepts) from None
        if not self.lo <= value <= self.hi:
            raise _refuse(self.accepts)
        return value


@dataclass(frozen=True, slots=True)
class FloatRange:
    lo: float
    hi: float

    @property
    def accepts(self) -> str:
        return f"a number in [{self.lo}, {self.hi}]"

    def __call__(self, raw: str, /) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise _refuse(self.accepts) from None
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise _refuse(self.accepts)
        return value


@dataclass(frozen=True, slots=True)
class Url:
    schemes: tuple[str, ...]

    @property
    def accepts(self) -> str:
        return f"a URL with scheme {' or '.join(self.schemes)}"

    def __call__(self, raw: str, /) -> str:
        value = raw.strip()
        parts = urlsplit(value)
        if parts.scheme not in self.schemes or not (parts.hostname or parts.path):
            raise _refuse(self.accepts)
        return value


@dataclass(frozen=True, slots=True)
class OrNone(Generic[T]):
    """Empty (or blank) means unset: ``None``."""

    parse: Parser[T]

    @property
    def accepts(self) -> str:
        return f"{self.parse.accepts}, or empty for none"

    def __call__(self, raw: str, /) -> T | None:
        return None if raw.strip() == "" else self.parse(raw)


@dataclass(frozen=True, slots=True)
class Choice:
    choices: tuple[str, ...]

    @property
    def accepts(self) -> str:
        return f"one of {', '.join(self.choices)}"

    def __call__(self, raw: str, /) -> str:
        value = raw.strip().lower()
        if value not in self.choices:
            raise _refuse(self.accepts)
        return value


@dataclass(frozen=True, slots=True)
class Text:
    accepts = "any text"

    def __call__(self, raw: str, /) -> str:
        return raw.strip()


@dataclass(frozen=True, slots=True)
class KeyPrefix:
    accepts = "a non-empty prefix without braces or whitespace"

    def __call__(self, raw: str, /) -> str:
        value = raw.strip()
        if not value or any(c in value for c in "{} \t\n"):
            raise _refuse(self.accepts)
        return value


def _names(raw: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))


@dataclass(frozen=True, slots=True)
class FieldNames:
    accepts = "comma-separated names of letters, digits, '_' and '-'"

    def __call__(self, raw: str, /) -> tuple[str, ...]:
        names = _names(raw)
        if not all(n.replace("_", "").replace("-", "").isalnum() and n.isascii() for n in names):
            raise _refuse(self.accepts)
        return names


@dataclass(frozen=True, slots=True)
class PolicyNames:
    accepts = f"policy names among {', '.join(POLICIES)}"

    def __call__(self, raw: str, /) -> tuple[str, ...]:
        names = _names(raw)
        if any(n not in POLICIES for n in names):
            raise _refuse(self.accepts)
        return names


@dataclass(frozen=True, slots=True)
class Networks:
    accepts = "comma-separated IP networks (CIDR)"

    def __call__(self, raw: str, /) -> tuple[IpNetwork, ...]:
        try:
            return tuple(
                ipaddress.ip_network(n.strip(), strict=False) for n in raw.split(",") if n.strip()
            )
        except ValueError:
            raise _refuse(self.accepts) from None
