"""The programs' command line: ``--help`` and ``--version``; configuration stays in the environment.

Every console script builds its parser here, before it loads settings, so ``--help`` and
``--version`` answer without reading the environment or opening a socket, and a stray
argument is a usage error (exit 2) rather than a server started by mistake. The epilog lists
every environment variable the program's settings class declares, section by section, each
with that program's default: generated from the classes, as ``docs/configuration.md`` is.
"""

import argparse
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .settings.programs import ProgramSettings
from .version import build_version

if TYPE_CHECKING:
    from .settings.reference import Variable

__all__ = ("parse_program_args", "program_parser")

_WIDTH = 79


def _assignment(variable: "Variable") -> str:
    from .settings.reference import format_default

    if variable.default is None:
        shown = f"{variable.name} (unset)"
    else:
        value = format_default(variable.default)
        shown = f"{variable.name}={value}" if value else f"{variable.name} (empty)"
    return shown + ("  [secret]" if variable.secret else "")


def _epilog(settings: type[ProgramSettings]) -> str:
    from .settings.reference import variables

    lines = ["environment variables, by section (unset ones take the values shown):"]
    section = None
    for variable in variables(settings):
        if variable.section is not section:
            section = variable.section
            lines += ["", f"{section.title}:"]
        lines.append("  " + _assignment(variable))
        lines.append(
            textwrap.fill(
                variable.description,
                width=_WIDTH,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
            )
        )
    return "\n".join(lines)


class _ProgramParser(argparse.ArgumentParser):
    """Writes its epilog only when help is asked for: describing every variable means
    building every program's settings class, which a program that just starts skips."""

    def __init__(self, settings: type[ProgramSettings] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._settings = settings

    def format_help(self) -> str:
        if self._settings is not None and self.epilog is None:
            self.epilog = _epilog(self._settings)
        return super().format_help()


def program_parser(
    prog: str, description: str, settings: type[ProgramSettings] | None = None
) -> argparse.ArgumentParser:
    """A parser with ``-h/--help`` and ``--version``; callers may add their own arguments.

    ``settings`` is the program's settings class (None: it reads no environment variable);
    its ``program`` must be ``prog``, so that no program shows another's configuration.
    """
    if settings is not None and settings.program != prog:
        raise ValueError(f"{settings.__name__} is the settings of {settings.program}, not {prog}")
    parser = _ProgramParser(
        settings,
        prog=prog,
        description=textwrap.fill(" ".join(description.split()), width=_WIDTH),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{prog} {build_version()}")
    return parser


def parse_program_args(
    prog: str,
    description: str,
    settings: type[ProgramSettings],
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """Parse a long-running program's command line, which takes no arguments of its own.

    ``--help`` and ``--version`` print and exit 0; anything else exits 2 with the usage.
    ``argv`` defaults to ``sys.argv[1:]``.
    """
    return program_parser(prog, description, settings).parse_args(argv)
