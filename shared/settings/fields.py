"""Fields read from the environment, and what every section of them is.

A section is a frozen dataclass of the variables one concern reads; each field carries its
variable's name, parser, description and secrecy in its metadata. Sections declare
``__slots__ = ()``: that keeps them free of instance layout, so a program's class may
inherit any number of them and still be slotted itself. A section is never instantiated
on its own.
"""

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .values import Parser

__all__ = ("Section", "redefault", "variable")

T = TypeVar("T")


def variable(
    name: str, default: T, parse: Parser[T], description: str, *, secret: bool = False
) -> T:
    """A field read from the environment variable ``name``; a secret stays out of the repr
    (settings get logged) and out of the logs (``shared.logs.configured_secrets``)."""
    field: Any = dataclasses.field(
        default=default,
        repr=not secret,
        metadata={"env": name, "parse": parse, "description": description, "secret": secret},
    )
    return field  # type: ignore[no-any-return]  # a field stands for its default, as in dataclasses


def redefault(section: type["Section"], attribute: str, default: T) -> T:
    """``section``'s field ``attribute`` with a program's own default, its variable unchanged."""
    [declared] = [f for f in dataclasses.fields(section) if f.name == attribute]
    field: Any = dataclasses.field(default=default, repr=declared.repr, metadata=declared.metadata)
    return field  # type: ignore[no-any-return]  # as in variable()


class Section:
    """What every section has: a title for ``--help`` and ``docs/configuration.md``."""

    __slots__ = ()
    title: ClassVar[str]

    if TYPE_CHECKING:
        __dataclass_fields__: ClassVar[dict[str, "dataclasses.Field[Any]"]]
