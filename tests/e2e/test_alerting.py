"""A Redis outage seen the way an operator sees it: a real Prometheus, scraping the sidecar of
a real service, evaluates the project's own alert expression (ops/alerts.yml, with a short
``for:``) and the alert goes pending, fires, and resolves once Redis is back.

The test runs a redis-server of its own on a free port (never the machine's 6379), a fresh
Postgres schema of the machine's server, ``pulsecal-service`` and ``pulsecal-sidecar`` as
programs, and Debian's ``prometheus`` (installed by ``.ci/run``).
"""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import RedisServer, ServiceProcess, _Process, free_port
from tests.support.rules import alert_rules, write_test_rules
from tests.support.sidecar import PrometheusServer, SidecarProcess

TOKEN = "alerting-test-scrape-token"  # noqa: S105 - the test's own token, not a secret
NAMESPACE = "pulsecal-e2e"
# What a Redis outage sets off: the service cannot write its heartbeat, so the sidecar beside
# it reports pulsecal_service_up 0.
ALERTS = ("PodHeartbeatMissing",)
HOLD = 2.0  # the test rules' `for:`, seconds
INTERVAL = "500ms"  # scrape and evaluation


@pytest.fixture
def processes() -> Iterator[list[_Process]]:
    """Whatever the test starts is killed after it, and its output shown if it failed."""
    started: list[_Process] = []
    yield started
    for process in reversed(started):
        process.kill()
        print(f"--- {process.stdout_path}\n{process.output()[-3000:]}")


async def _active_alerts(prometheus: PrometheusServer) -> dict[str, str]:
    """The active alerts of the test rules: name -> state (pending or firing)."""
    data: Any = await prometheus.api("alerts")
    return {
        alert["labels"]["alertname"]: alert["state"]
        for alert in data["alerts"]
        if alert["labels"]["alertname"] in ALERTS
    }


async def _wait_until(
    prometheus: PrometheusServer, wanted: dict[str, str], *, within: float, seen: list[str]
) -> float:
    """Poll until the active alerts are ``wanted``; record every state seen; when it was."""
    async with asyncio.timeout(within):
        while True:
            active = await _active_alerts(prometheus)
            state = ",".join(f"{name}={s}" for name, s in sorted(active.items())) or "quiet"
            if not seen or seen[-1] != state:
                seen.append(state)
            if active == wanted:
                return time.monotonic()
            await asyncio.sleep(0.1)


@pytest.mark.timeout(60)
async def test_a_redis_outage_fires_the_projects_alert_and_its_return_resolves_it(
    tmp_path: Path, migrated: str, key_prefix: str, processes: list[_Process]
) -> None:
    redis_port = free_port()
    assert redis_port not in (6379, 5432)
    redis = RedisServer(tmp_path / "redis", port=redis_port)
    processes.append(redis)
    redis.start()
    await redis.wait_ready()

    pod = f"alerting-{key_prefix.split(':')[1]}"
    config = {
        "REDIS_URL": redis.url,
        "DATABASE_URL": migrated,
        "REDIS_KEY_PREFIX": key_prefix,
        "POD_NAME": pod,
        "HEARTBEAT_INTERVAL": "0.2",
        "HEARTBEAT_TTL": "1",
        "HEALTH_CHECK_INTERVAL": "0.5",
        "HEALTH_CHECK_TIMEOUT": "300",
        "TELEMETRY_FLUSH_INTERVAL": "0.05",
        "SIDECAR_BLOCK_MS": "200",
        "SIDECAR_CHECKPOINT_INTERVAL": "0.2",
        "METRICS_TOKEN": TOKEN,
    }
    service = ServiceProcess(config, log_dir=tmp_path / "service")
    sidecar = SidecarProcess(config, log_dir=tmp_path / "sidecar")
    processes += [service, sidecar]
    service.start()
    sidecar.start()

    rules = write_test_rules(tmp_path / "rules.yml", ALERTS, hold=f"{HOLD:g}s")
    prometheus = PrometheusServer(
        tmp_path / "prometheus",
        targets=[f"127.0.0.1:{sidecar.port}"],
        bearer_token=TOKEN,
        interval=INTERVAL,
        rule_files=[tmp_path / "rules.yml"],
        job="pulsecal-api",
        labels={"namespace": NAMESPACE, "pod": pod},
    )
    processes.append(prometheus)
    prometheus.start()
    await asyncio.gather(service.wait_started(), sidecar.wait_live(), prometheus.wait_ready())

    # The copies are loaded and healthy, and the stack is healthy: nothing active.
    groups: Any = await prometheus.api("rules")
    loaded = {rule["name"]: rule for group in groups["groups"] for rule in group["rules"]}
    assert set(loaded) == set(ALERTS)
    project = alert_rules()
    for name, rule in rules.items():
        # The project's rule as it is, but for `for:`.
        assert {**rule, "for": project[name]["for"]} == project[name]
        assert loaded[name]["duration"] == HOLD
    async with asyncio.timeout(15):
        while await prometheus.query_value(f'pulsecal_service_up{{pod="{pod}"}}') != 1:
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # two evaluations on a healthy stack
    rule_health = {
        r["name"]: (r["health"], r.get("lastError", ""))
        for g in (await prometheus.api("rules"))["groups"]  # type: ignore[index]
        for r in g["rules"]
    }
    assert rule_health == dict.fromkeys(ALERTS, ("ok", ""))
    assert await _active_alerts(prometheus) == {}

    # Redis goes away: pending within a few scrapes, firing once `for:` has run out.
    seen: list[str] = []
    redis.kill()
    down = time.monotonic()
    pending = await _wait_until(prometheus, dict.fromkeys(ALERTS, "pending"), within=15, seen=seen)
    firing = await _wait_until(prometheus, dict.fromkeys(ALERTS, "firing"), within=15, seen=seen)
    assert firing - pending >= HOLD - 0.6, seen  # held for `for:` (less an evaluation's slack)
    [alert] = [a for a in (await prometheus.api("alerts"))["alerts"] if a["state"] == "firing"]  # type: ignore[index]
    assert alert["labels"] == {
        "alertname": ALERTS[0],
        "severity": rules[ALERTS[0]]["labels"]["severity"],
        "job": "pulsecal-api",
        "namespace": NAMESPACE,
        "pod": pod,
        "instance": f"127.0.0.1:{sidecar.port}",
    }
    assert alert["annotations"]["summary"] == f"{NAMESPACE}/{pod}: no heartbeat from the service"
    # The sidecar was scraped all along: this is the heartbeat's alert, not a scrape failure.
    assert await prometheus.query_value(f'min_over_time(up{{pod="{pod}"}}[3s])') == 1

    # Redis is back (the same port, the same data): the heartbeat resumes and the alert goes.
    back = RedisServer(tmp_path / "redis", port=redis_port)
    processes.append(back)
    back.start()
    await back.wait_ready()
    returned = time.monotonic()
    resolved = await _wait_until(prometheus, {}, within=15, seen=seen)
    assert seen == [
        "quiet",
        *(",".join(f"{n}={s}" for n in sorted(ALERTS)) for s in ("pending", "firing")),
        "quiet",
    ], seen
    print(
        f"pending after {pending - down:.1f}s, firing after {firing - down:.1f}s,"
        f" resolved {resolved - returned:.1f}s after Redis was back"
    )
    for process in (service, sidecar, prometheus):
        assert process.returncode is None, process.output()[-3000:]
