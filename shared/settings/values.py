"""How a variable's text becomes a value: each parser says what it accepts, in words.

The same words make the error message (``expected <accepts>``), the ``--help`` epilogs and
``docs/configuration.md``, so what is refused and what is documented cannot drift apart.
"""

import ipaddress
import math
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


class Boolean:
    __slots__ = ()
    accepts = "true or false"

    def __call__(self, raw: str, /) -> bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise _refuse(self.accepts)


class IntRange:
    __slots__ = ("accepts", "hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.accepts = f"an integer in [{lo}, {hi}]"

    def __call__(self, raw: str, /) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise _refuse(self.accepts) from None
        if not self.lo <= value <= self.hi:
            raise _refuse(self.accepts)
        return value


class FloatRange:
    __slots__ = ("accepts", "hi", "lo")

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.accepts = f"a number in [{lo}, {hi}]"

    def __call__(self, raw: str, /) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise _refuse(self.accepts) from None
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise _refuse(self.accepts)
        return value


class Url:
    __slots__ = ("accepts", "schemes")

    def __init__(self, schemes: tuple[str, ...]) -> None:
        self.schemes = schemes
        self.accepts = f"a URL with scheme {' or '.join(schemes)}"

    def __call__(self, raw: str, /) -> str:
        value = raw.strip()
        parts = urlsplit(value)
        if parts.scheme not in self.schemes or not (parts.hostname or parts.path):
            raise _refuse(self.accepts)
        return value


class OrNone(Generic[T]):
    """Empty (or blank) means unset: ``None``."""

    __slots__ = ("accepts", "parse")

    def __init__(self, parse: Parser[T]) -> None:
        self.parse = parse
        self.accepts = f"{parse.accepts}, or empty for none"

    def __call__(self, raw: str, /) -> T | None:
        return None if raw.strip() == "" else self.parse(raw)


class Choice:
    __slots__ = ("accepts", "choices")

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices
        self.accepts = f"one of {', '.join(choices)}"

    def __call__(self, raw: str, /) -> str:
        value = raw.strip().lower()
        if value not in self.choices:
            raise _refuse(self.accepts)
        return value


class Text:
    __slots__ = ()
    accepts = "any text"

    def __call__(self, raw: str, /) -> str:
        return raw.strip()


class KeyPrefix:
    __slots__ = ()
    accepts = "a non-empty prefix without braces or whitespace"

    def __call__(self, raw: str, /) -> str:
        value = raw.strip()
        if not value or any(c in value for c in "{} \t\n"):
            raise _refuse(self.accepts)
        return value


def _names(raw: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))


class FieldNames:
    __slots__ = ()
    accepts = "comma-separated names of letters, digits, '_' and '-'"

    def __call__(self, raw: str, /) -> tuple[str, ...]:
        names = _names(raw)
        if not all(n.replace("_", "").replace("-", "").isalnum() and n.isascii() for n in names):
            raise _refuse(self.accepts)
        return names


class PolicyNames:
    __slots__ = ()
    accepts = f"policy names among {', '.join(POLICIES)}"

    def __call__(self, raw: str, /) -> tuple[str, ...]:
        names = _names(raw)
        if any(n not in POLICIES for n in names):
            raise _refuse(self.accepts)
        return names


class Networks:
    __slots__ = ()
    accepts = "comma-separated IP networks (CIDR)"

    def __call__(self, raw: str, /) -> tuple[IpNetwork, ...]:
        try:
            return tuple(
                ipaddress.ip_network(n.strip(), strict=False) for n in raw.split(",") if n.strip()
            )
        except ValueError:
            raise _refuse(self.accepts) from None
