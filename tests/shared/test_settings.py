"""Settings: read once from the environment; a bad value stops the process with one line.

Each program reads its own class, made of the sections it needs, and validates only those.
"""

import ast
import dataclasses
import os
import subprocess
import sys

import pytest

import shared.settings as settings_package
from shared.settings import (
    PROGRAMS,
    AdminSettings,
    AnalysisSettings,
    ProgramSettings,
    ServiceSettings,
    SettingsError,
    SidecarSettings,
    Variable,
    WorkerSettings,
    load_settings,
    variables,
)


def test_defaults_match_the_documented_contract() -> None:
    settings = load_settings({}, ServiceSettings)

    assert (settings.port, load_settings({}, SidecarSettings).sidecar_port) == (3001, 9464)
    assert (settings.rate_limit_max, settings.rate_limit_ttl) == (100, 60)
    assert settings.health_check_timeout_ms == 5000
    assert settings.redis_key_prefix == "pulsecal:"


def test_values_are_parsed_into_their_types() -> None:
    settings = load_settings(
        {
            "PORT": "8080",
            "ENABLE_FILE_LOGGING": "yes",
            "TOKEN_REFRESH_INTERVAL": "2.5",
            "AI_SERVICE_URL": "http://ai:8000",
            "LOGSTASH_HOST": "",
        },
        ServiceSettings,
    )

    assert settings.port == 8080
    assert settings.enable_file_logging is True
    assert settings.token_refresh_interval == 2.5
    assert settings.ai_service_url == "http://ai:8000"
    assert settings.logstash_host is None


@pytest.mark.parametrize("program", PROGRAMS)
def test_settings_are_frozen(program: type[ProgramSettings]) -> None:
    settings = load_settings({}, program)
    name = dataclasses.fields(program)[0].name

    with pytest.raises(AttributeError):
        setattr(settings, name, None)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("PORT", "http", "PORT='http': expected an integer in [1, 65535]"),
        ("PORT", "70000", "PORT='70000': expected an integer in [1, 65535]"),
        ("ENABLE_FILE_LOGGING", "maybe", "ENABLE_FILE_LOGGING='maybe': expected true or false"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL='localhost:6379': expected a URL with scheme"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL='loud': expected one of"),
        ("WRITE_TIMEOUT", "nan", "WRITE_TIMEOUT='nan': expected a number in"),
        ("REDIS_KEY_PREFIX", "a{b}", "REDIS_KEY_PREFIX='a{b}': expected a non-empty prefix"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_was_expected(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({name: value}, ServiceSettings)

    assert str(error.value).startswith(expected)


@pytest.mark.parametrize("program", [ServiceSettings, WorkerSettings, SidecarSettings])
def test_heartbeat_ttl_must_outlive_its_interval(program: type[ProgramSettings]) -> None:
    with pytest.raises(SettingsError, match="HEARTBEAT_TTL"):
        load_settings({"HEARTBEAT_INTERVAL": "5", "HEARTBEAT_TTL": "5"}, program)


def test_pod_keys_grace_must_outlive_the_heartbeat() -> None:
    with pytest.raises(SettingsError, match="POD_KEYS_GRACE=10: expected more than HEARTBEAT_TTL"):
        load_settings({"HEARTBEAT_TTL": "10", "POD_KEYS_GRACE": "10"}, WorkerSettings)
    with pytest.raises(SettingsError, match="POD_KEYS_GRACE"):
        load_settings({"POD_KEYS_GRACE": "0"}, WorkerSettings)
    settings = load_settings({"HEARTBEAT_TTL": "10", "POD_KEYS_GRACE": "11"}, WorkerSettings)
    assert settings.pod_keys_grace == 11
    assert load_settings({}, WorkerSettings).pod_keys_grace == 86_400


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_setting_has_an_environment_variable(program: type[ProgramSettings]) -> None:
    names = [f.metadata.get("env") for f in dataclasses.fields(program)]

    assert all(names)
    assert len(set(names)) == len(names)


def test_a_variable_means_the_same_attribute_in_every_program() -> None:
    attributes: dict[str, set[str]] = {}
    for program in PROGRAMS:
        for field in dataclasses.fields(program):
            attributes.setdefault(field.metadata["env"], set()).add(field.name)

    assert {name: names for name, names in attributes.items() if len(names) > 1} == {}


@pytest.mark.parametrize(("program", "variable"), [("service", "PORT"), ("admin", "DATABASE_URL")])
def test_programs_exit_with_one_line_on_a_bad_value(program: str, variable: str) -> None:
    args = [sys.executable, "-m", program]
    if program.endswith("admin"):
        args = [sys.executable, "-c", "from admin.__main__ import main; main(['device', 'list'])"]
    result = subprocess.run(
        args,
        env={**os.environ, variable: "not-a-port"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"{variable}='not-a-port'" in result.stderr


def test_a_program_validates_only_the_variables_it_reads() -> None:
    elsewhere = {"PORT": "not-a-port", "RATE_LIMIT_MAX": "many", "WORKER_BATCH": "0"}

    admin = load_settings(elsewhere, AdminSettings)
    with pytest.raises(SettingsError, match="RATE_LIMIT_MAX"):
        load_settings({"RATE_LIMIT_MAX": "many"}, ServiceSettings)
    with pytest.raises(SettingsError, match="WORKER_BATCH"):
        load_settings({"WORKER_BATCH": "0"}, WorkerSettings)

    assert admin == AdminSettings()
    assert load_settings({"PORT": "8080", "WORKER_BATCH": "0"}, SidecarSettings) == (
        SidecarSettings()
    )


def test_the_analysis_service_has_its_own_default_port() -> None:
    assert load_settings({}, AnalysisSettings).port == 8000
    assert load_settings({}, ServiceSettings).port == 3001
    assert load_settings({"PORT": "8123"}, AnalysisSettings).port == 8123


def test_secrets_are_kept_out_of_the_repr() -> None:
    settings = load_settings(
        {"ADMIN_TOKEN": "adm-1", "METRICS_TOKEN": "met-2", "HEALTH_DETAIL_TOKEN": "det-3"},
        ServiceSettings,
    )

    assert (settings.admin_token, settings.metrics_token) == ("adm-1", "met-2")
    assert not {"adm-1", "met-2", "det-3"} & set(repr(settings).replace("'", " ").split())
    assert {v.name for v in variables() if v.secret} == {
        "ADMIN_TOKEN",
        "METRICS_TOKEN",
        "HEALTH_DETAIL_TOKEN",
    }


def refusal(variable: Variable, raw: str) -> str | None:
    """What the variable's parser says of ``raw``, None when it takes it."""
    [field] = [f for f in dataclasses.fields(variable.section) if f.name == variable.attribute]
    try:
        field.metadata["parse"](raw)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("variable", variables(), ids=lambda v: v.name)
def test_each_variable_says_what_it_accepts_in_the_words_of_its_error(variable: Variable) -> None:
    error = refusal(variable, "\x00 not a value {")

    assert variable.description
    if error is not None:
        assert error.startswith("expected ")
        assert variable.accepts.startswith(error.removeprefix("expected "))


def test_the_programs_of_a_variable_are_the_classes_that_declare_it() -> None:
    readers = {v.name: v.programs for v in variables()}

    assert readers["ADMIN_TOKEN"] == ("pulsecal-service",)
    assert readers["DATABASE_URL"] == (
        "pulsecal-service",
        "pulsecal-worker",
        "pulsecal-sidecar",
        "pulsecal-admin",
        "devstack",
    )
    for program in PROGRAMS:
        declared = {f.metadata["env"] for f in dataclasses.fields(program)}
        assert declared == {v.name for v in variables() if program.program in v.programs}


def test_every_public_name_resolves() -> None:
    missing = [name for name in settings_package.__all__ if not hasattr(settings_package, name)]

    assert missing == []


def test_a_program_builds_only_its_own_settings_class() -> None:
    code = (
        "import os, sys\n"
        "from shared.cli import program_parser\n"
        "from shared.settings import SidecarSettings, load_settings\n"
        "program_parser('pulsecal-sidecar', 'A sidecar.', SidecarSettings)\n"
        "load_settings(os.environ, SidecarSettings)\n"
        "print(sorted(m for m in sys.modules if m.startswith('shared.settings.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )

    loaded = set(ast.literal_eval(result.stdout))
    assert loaded.isdisjoint(
        {f"shared.settings.{m}" for m in ("service", "worker", "analysis", "admin", "devstack")}
    )
    assert "shared.settings.reference" not in loaded
