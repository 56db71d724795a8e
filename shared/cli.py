"""The programs' command line: ``--help`` and ``--version``; configuration stays in the environment.

Every console script builds its parser here, before it loads settings, so ``--help`` and
``--version`` answer without reading the environment or opening a socket, and a stray
argument is a usage error (exit 2) rather than a server started by mistake. The epilog lists
the environment variables that matter most to the program, each with the default
``Settings`` declares for it.
"""

import argparse
import dataclasses
import textwrap
from collections.abc import Mapping, Sequence

from .settings import Settings
from .version import build_version

__all__ = ("LOGGING_ENV", "TRACING_ENV", "parse_program_args", "program_parser")

# What every program that calls setup_logging / setup_tracing reads, for its env_vars.
LOGGING_ENV = {
    "LOG_LEVEL": "trace, debug, info, warning, error or critical",
    "ENABLE_FILE_LOGGING": "also write daily log files under LOG_DIR",
    "LOG_DIR": "where the log files go",
    "LOGSTASH_HOST": "Logstash to send JSON log lines to (LOGSTASH_PORT)",
}
TRACING_ENV = {
    "TRACING_ENABLED": "export OpenTelemetry spans",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "OTLP/HTTP collector the spans go to",
}

_WIDTH = 79
_DEFAULTS: dict[str, object] = {
    f.metadata["env"]: f.default for f in dataclasses.fields(Settings) if "env" in f.metadata
}


def _assignment(name: str, value: object) -> str:
    if value is None:
        return f"{name} (unset)"
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, tuple):
        value = ",".join(str(v) for v in value)
    return f"{name}={value}" if value != "" else f"{name} (empty)"


def _epilog(env_vars: Mapping[str, str], defaults: Mapping[str, object]) -> str:
    unknown = [name for name in env_vars if name not in _DEFAULTS]
    if unknown:
        raise ValueError(f"not read by Settings: {', '.join(unknown)}")
    lines = ["environment variables (unset ones take the values shown):"]
    for name, meaning in env_vars.items():
        lines.append("  " + _assignment(name, defaults.get(name, _DEFAULTS[name])))
        lines.append(
            textwrap.fill(meaning, width=_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )
    return "\n".join(lines)


def program_parser(
    prog: str,
    description: str,
    env_vars: Mapping[str, str] | None = None,
    *,
    defaults: Mapping[str, object] | None = None,
) -> argparse.ArgumentParser:
    """A parser with ``-h/--help`` and ``--version``; callers may add their own arguments.

    ``env_vars`` maps the variables to list in the epilog (names ``Settings`` reads; any
    other is a ValueError) to what each does; ``defaults`` overrides the default shown where
    the program's own differs from the one ``Settings`` declares.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=textwrap.fill(" ".join(description.split()), width=_WIDTH),
        epilog=_epilog(env_vars, defaults or {}) if env_vars else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{prog} {build_version()}")
    return parser


def parse_program_args(
    prog: str,
    description: str,
    env_vars: Mapping[str, str],
    argv: Sequence[str] | None = None,
    *,
    defaults: Mapping[str, object] | None = None,
) -> argparse.Namespace:
    """Parse a long-running program's command line, which takes no arguments of its own.

    ``--help`` and ``--version`` print and exit 0; anything else exits 2 with the usage.
    ``argv`` defaults to ``sys.argv[1:]``.
    """
    return program_parser(prog, description, env_vars, defaults=defaults).parse_args(argv)
