"""``python -m devtools.devstack`` (``make run``): the whole stack from one command."""

import asyncio
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from devtools import devstack
from tests.support.rules import ALERTS
from tests.support.sidecar import PROMTOOL_BIN

# Port 1 never answers: devstack must start its own throwaway Redis and Postgres on free
# ports, never touching the machine's servers on 6379 and 5432.
DEAD_REDIS = "redis://127.0.0.1:1/0"
DEAD_POSTGRES = "postgresql://postgres@127.0.0.1:1/postgres"


def _prometheus_api(url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{url}/api/v1/{path}", timeout=5) as response:  # noqa: S310
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _check_prometheus(url: str) -> None:
    """The project's alert groups loaded, and both sidecars scraped."""
    groups = _prometheus_api(url, "rules")["groups"]
    project = yaml.safe_load(ALERTS.read_text())["groups"]
    # Prometheus lists the groups in its own order (by name), the rules in the file's.
    assert {g["name"]: [r["name"] for r in g["rules"]] for g in groups} == {
        g["name"]: [r["alert"] for r in g["rules"]] for g in project
    }
    assert len(groups) == len(project)
    deadline = time.monotonic() + 20
    while True:
        active = _prometheus_api(url, "targets?state=active")["activeTargets"]
        health = sorted((t["labels"]["job"], t["health"]) for t in active)
        if health == [("pulsecal-api", "up"), ("pulsecal-worker", "up")]:
            break
        assert time.monotonic() < deadline, active
        time.sleep(0.3)
    assert {t["labels"]["namespace"] for t in active} == {"devstack"}


@pytest.mark.timeout(180)
def test_devstack_starts_throwaway_servers_acks_simulated_batches_and_prometheus_scrapes() -> None:
    env = {
        **os.environ,
        "REDIS_URL": DEAD_REDIS,
        "DATABASE_URL": DEAD_POSTGRES,
        # The sidecars want it on /metrics: Prometheus's targets are up only if it sends it.
        "METRICS_TOKEN": "devstack-test-metrics-token",
    }
    env.pop("PORT", None)

    lines: list[str] = []
    prometheus_seen = threading.Event()

    def read(stdout: IO[str]) -> None:
        for line in stdout:
            lines.append(line)
            if re.match(r"^\s+prometheus http://", line):
                prometheus_seen.set()

    with subprocess.Popen(
        [sys.executable, "-m", "devtools.devstack", "--duration=8", "--devices=2", "--port=0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdout is not None
        reader = threading.Thread(target=read, args=(process.stdout,), daemon=True)
        reader.start()
        try:
            # While the stack runs (its --duration counts from the "up" summary).
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if prometheus_seen.wait(timeout=0.2):
                    break
            if prometheus_seen.is_set():
                found = re.search(r"prometheus (http://\S+)/ ", "".join(lines))
                assert found is not None, "".join(lines)
                _check_prometheus(found.group(1))
            assert process.wait(timeout=60) == 0, "".join(lines)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(timeout=10)

    output = "".join(lines)
    assert prometheus_seen.is_set(), output
    assert output.count("starting a throwaway one") == 2, output
    summary = re.search(r"^pulsecal-sim summary: .* acked=(\d+) ", output, re.MULTILINE)
    assert summary is not None, output
    assert int(summary.group(1)) > 0, output
    for stopped in (
        "simulator (exit 0)",
        "service (exit 0)",
        "prometheus (exit 0)",
        "postgres",
        "redis",
    ):
        assert f"devstack: stopped {stopped}" in output, output
    devices_file = re.search(r"tokens in (\S+)", output)
    assert devices_file is not None, output
    assert not Path(devices_file.group(1)).parent.exists(), "the temporary directory is left"


def test_the_prometheus_config_scrapes_every_sidecar_with_the_token_and_loads_the_rules(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("local-token")
    targets = [
        devstack.ScrapeTarget(address="127.0.0.1:9464", job="pulsecal-api", pod="box"),
        devstack.ScrapeTarget(address="127.0.0.1:40001", job="pulsecal-worker", pod="box-worker"),
    ]
    config = devstack.prometheus_config(
        targets, rule_files=[devstack.ALERT_RULES], token_file=token_file
    )
    assert devstack.ALERT_RULES == ALERTS
    assert config["rule_files"] == [str(ALERTS)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"pulsecal-api", "pulsecal-worker"}
    for job in jobs.values():
        assert job["authorization"] == {"type": "Bearer", "credentials_file": str(token_file)}
    [api] = jobs["pulsecal-api"]["static_configs"]
    assert api == {"targets": ["127.0.0.1:9464"], "labels": {"namespace": "devstack", "pod": "box"}}

    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [PROMTOOL_BIN, "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    without_token = devstack.prometheus_config(targets, rule_files=[], token_file=None)
    assert all("authorization" not in job for job in without_token["scrape_configs"])


async def test_without_prometheus_on_path_the_stack_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devstack.shutil, "which", lambda name: None)
    out = io.StringIO()
    async with contextlib.AsyncExitStack() as exits:
        stack = devstack._Stack(run_dir=tmp_path, exits=exits, hurry=asyncio.Event(), out=out)
        assert await devstack._start_prometheus(stack, [], {}, within=1.0) is None
        assert not stack.children
    assert "apt-get install prometheus" in out.getvalue()
    assert "running without it" in out.getvalue()
