"""Settings: read once from the environment; a bad value stops the process with one line."""

import dataclasses
import os
import subprocess
import sys

import pytest

from shared.settings import Settings, SettingsError, load_settings


def test_defaults_match_the_documented_contract() -> None:
    settings = load_settings({})

    assert (settings.port, settings.sidecar_port) == (3001, 9464)
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
        }
    )

    assert settings.port == 8080
    assert settings.enable_file_logging is True
    assert settings.token_refresh_interval == 2.5
    assert settings.ai_service_url == "http://ai:8000"
    assert settings.logstash_host is None


def test_settings_are_frozen() -> None:
    settings = load_settings({})

    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


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
        load_settings({name: value})

    assert str(error.value).startswith(expected)


def test_heartbeat_ttl_must_outlive_its_interval() -> None:
    with pytest.raises(SettingsError, match="HEARTBEAT_TTL"):
        load_settings({"HEARTBEAT_INTERVAL": "5", "HEARTBEAT_TTL": "5"})


def test_every_setting_has_an_environment_variable() -> None:
    names = [f.metadata.get("env") for f in dataclasses.fields(Settings)]

    assert all(names)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("program", ["service", "admin"])
def test_programs_exit_with_one_line_on_a_bad_value(program: str) -> None:
    args = [sys.executable, "-m", program]
    if program.endswith("admin"):
        args = [sys.executable, "-c", "from admin.__main__ import main; main(['device', 'list'])"]
    result = subprocess.run(
        args,
        env={**os.environ, "PORT": "not-a-port"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "PORT='not-a-port'" in result.stderr
