"""The console scripts' command line: ``--help``, ``--version``, usage errors; no side effects.

Each test runs the installed script (the one Kubernetes and ``make run`` start) in a child
process, as an operator would.
"""

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cli import program_parser
from shared.settings import (
    AdminSettings,
    AnalysisSettings,
    ProgramSettings,
    ServiceSettings,
    SidecarSettings,
    WorkerSettings,
    sections_of,
    variables,
)
from shared.version import build_version
from tests.support.procs import free_port

BIN = Path(sys.executable).parent

# Each script, and an environment variable its --help must name (None: it reads none).
SCRIPTS = {
    "pulsecal-service": "REDIS_URL",
    "pulsecal-sidecar": "METRICS_TOKEN",
    "pulsecal-worker": "DATABASE_URL",
    "pulsecal-analysis": "PORT",
    "pulsecal-admin": "DATABASE_URL",
    "pulsecal-sim": None,
}
# The long-running ones, and the variable that holds the port each would listen on.
SERVERS = {
    "pulsecal-service": "PORT",
    "pulsecal-sidecar": "SIDECAR_PORT",
    "pulsecal-worker": "WORKER_PORT",
    "pulsecal-analysis": "PORT",
}


def run(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / script), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def trap() -> Iterator[socket.socket]:
    """A listening socket on a free port that nothing should connect to."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setblocking(False)
        yield sock


def connections_made(trap: socket.socket) -> int:
    """How many connections reached the trap (the kernel queues them, accepted or not)."""
    count = 0
    while True:
        try:
            conn, _ = trap.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize(("script", "env_var"), SCRIPTS.items())
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_the_environment_and_exits_0(
    script: str, env_var: str | None, flag: str
) -> None:
    result = run(script, flag)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script} [-h] [--version]")
    assert "--version" in result.stdout
    if env_var is not None:
        assert f"\n  {env_var}" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_version_prints_the_program_and_the_package_version(script: str) -> None:
    result = run(script, "--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{script} {build_version()}\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_option_is_a_usage_error(script: str) -> None:
    result = run(script, "--bogus")

    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: {script}")
    assert f"{script}: error:" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("script", SERVERS)
def test_servers_take_no_positional_arguments(script: str) -> None:
    result = run(script, "serve")

    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "unrecognized arguments: serve" in result.stderr


@pytest.mark.parametrize(("script", "port_var"), SERVERS.items())
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_connect_to_nothing_and_listen_on_nothing(
    script: str, port_var: str, flag: str, trap: socket.socket, tmp_path: Path
) -> None:
    trap_port = trap.getsockname()[1]
    port = free_port()
    log_dir = tmp_path / "logs"
    # Every place the program could connect to is the trap; file logging would make log_dir.
    env = {
        port_var: str(port),
        "REDIS_URL": f"redis://127.0.0.1:{trap_port}/0",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{trap_port}/postgres",
        "AI_SERVICE_URL": f"http://127.0.0.1:{trap_port}",
        "LOGSTASH_HOST": "127.0.0.1",
        "LOGSTASH_PORT": str(trap_port),
        "TRACING_ENABLED": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{trap_port}",
        "ENABLE_FILE_LOGGING": "true",
        "LOG_DIR": str(log_dir),
    }

    result = run(script, flag, env=env)

    assert result.returncode == 0, result.stderr
    assert connections_made(trap) == 0
    assert bindable(port)
    assert not log_dir.exists()


@pytest.mark.parametrize("script", SERVERS)
def test_help_does_not_read_the_configuration(script: str) -> None:
    # Loading these settings would stop the program with exit 2 and one line naming them.
    env = {"LOG_LEVEL": "loud", "PORT": "not-a-port", "HEARTBEAT_TTL": "0"}

    help_result = run(script, "--help", env=env)
    version_result = run(script, "--version", env=env)

    assert (help_result.returncode, version_result.returncode) == (0, 0)
    assert "invalid configuration" not in help_result.stderr + version_result.stderr


def test_the_analysis_help_shows_its_own_default_port() -> None:
    result = run("pulsecal-analysis", "--help")

    assert "  PORT=8000\n" in result.stdout


@pytest.mark.parametrize(("script", "port_var"), SERVERS.items())
def test_without_arguments_the_servers_go_on_to_read_the_configuration(
    script: str, port_var: str
) -> None:
    result = run(script, env={port_var: "not-a-port"})

    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{script}: invalid configuration: {port_var}='not-a-port': "
        "expected an integer in [1, 65535]"
    )


# Each script's settings class (None: it reads no environment variable).
SETTINGS_CLASSES: dict[str, type[ProgramSettings] | None] = {
    "pulsecal-service": ServiceSettings,
    "pulsecal-sidecar": SidecarSettings,
    "pulsecal-worker": WorkerSettings,
    "pulsecal-analysis": AnalysisSettings,
    "pulsecal-admin": AdminSettings,
    "pulsecal-sim": None,
}


def listed_variables(help_text: str) -> list[str]:
    """The variable names the epilog lists: the lines of two spaces and a name."""
    return re.findall(r"^  ([A-Z][A-Z0-9_]*)(?:=| \()", help_text, flags=re.MULTILINE)


def test_a_program_can_list_only_its_own_settings() -> None:
    with pytest.raises(ValueError, match="ServiceSettings is the settings of pulsecal-service"):
        program_parser("pulsecal-worker", "A worker.", ServiceSettings)


@pytest.mark.parametrize(("script", "settings"), SETTINGS_CLASSES.items())
def test_help_lists_exactly_the_variables_the_program_reads_by_section(
    script: str, settings: type[ProgramSettings] | None
) -> None:
    result = run(script, "--help")

    expected = [] if settings is None else [v.name for v in variables(settings)]
    assert listed_variables(result.stdout) == expected
    if settings is not None:
        # Section titles are capitalised; argparse's own headings ("options:") are not.
        epilog = result.stdout.partition("\nenvironment variables")[2]
        titles = re.findall(r"^([A-Z][^\n]*):$", epilog, flags=re.MULTILINE)
        assert titles == [section.title for section in sections_of(settings)]


@pytest.mark.parametrize("script", ["pulsecal-service", "pulsecal-sidecar", "pulsecal-worker"])
def test_help_shows_each_default_and_marks_the_secrets(script: str) -> None:
    result = run(script, "--help")

    assert "  REDIS_KEY_PREFIX=pulsecal:\n" in result.stdout
    assert "  METRICS_TOKEN (unset)  [secret]\n" in result.stdout
    assert "  LOG_REDACT_FIELDS=authorization,cookie," in result.stdout
