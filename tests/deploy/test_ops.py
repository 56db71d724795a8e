"""ops/: the alert rules under promtool, the scrape config, the Grafana dashboard, Filebeat, and
all of them against a real Prometheus scraping two service + sidecar pods on one Redis.

``promtool`` and ``prometheus`` are Debian's (``.ci/run`` installs them). Debian builds
Prometheus without Kubernetes service discovery, so wherever ops/prometheus.yml is loaded the
``kubernetes_sd_configs`` of its Kubernetes job are swapped for a file of targets carrying the
same ``__meta_kubernetes_*`` labels pod discovery would: the job's relabelling is what gets
tested.
"""

import asyncio
import collections
import fnmatch
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientError, ClientSession, ClientTimeout, WSMsgType
from redis.asyncio import Redis

from shared.keys import Keys
from shared.logfiles import KINDS, file_name
from shared.telemetry import decode_heartbeat
from tests.support.env import REDIS_URL, Device, DeviceFactory
from tests.support.paths import ROOT_DIR
from tests.support.procs import _SETTINGS_ENV, READY_DEADLINE, ServiceProcess, _Process, free_port
from tests.support.sidecar import SidecarProcess

ROOT = ROOT_DIR
OPS = ROOT / "ops"
ALERTS = OPS / "alerts.yml"
DASHBOARD = OPS / "grafana" / "pulsecal.json"
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"
WORKER_BIN = Path(sys.executable).with_name("pulsecal-worker")
ANALYSIS_BIN = Path(sys.executable).with_name("pulsecal-analysis")

TOKEN = "ops-test-scrape-token"  # noqa: S105 - the test's own token, not a secret
NAMESPACE = "pulsecal-test"
# Metrics the rules and the dashboard use that no program exports yet.
PLANNED_METRICS: frozenset[str] = frozenset()
# The dependencies' figures every worker pod's sidecar exports alike (Redis per node, the
# readings streams per partition, the database's), with the label that tells their series
# apart (sidecar/dependencies.py).
DEPENDENCY_METRICS = {
    "pulsecal_redis_up": "redis_node",
    "pulsecal_redis_memory_used_bytes": "redis_node",
    "pulsecal_redis_memory_max_bytes": "redis_node",
    "pulsecal_redis_evicted_keys_total": "redis_node",
    "pulsecal_redis_rejected_connections_total": "redis_node",
    "pulsecal_redis_error_replies_total": "redis_node",
    "pulsecal_redis_connected_clients": "redis_node",
    "pulsecal_redis_blocked_clients": "redis_node",
    "pulsecal_redis_aof_enabled": "redis_node",
    "pulsecal_redis_persistence_ok": "redis_node",
    "pulsecal_redis_primary": "redis_node",
    "pulsecal_redis_connected_replicas": "redis_node",
    "pulsecal_redis_replica_lag_seconds": "redis_node",
    "pulsecal_redis_master_link_up": "redis_node",
    "pulsecal_redis_master_last_io_seconds": "redis_node",
    "pulsecal_readings_stream_length": "partition",
    "pulsecal_readings_group_lag": "partition",
    "pulsecal_readings_group_pending": "partition",
    "pulsecal_readings_dead_letters": "partition",
    "pulsecal_postgres_connections": "state",
    "pulsecal_postgres_database_size_bytes": "namespace",
    "pulsecal_postgres_readings_partitions_ahead": "namespace",
    "pulsecal_postgres_readings_oldest_partition_timestamp_seconds": "namespace",
}
# Metrics only a worker's sidecar exports: the Prometheus test below runs no worker.
WORKER_METRICS = frozenset({"pulsecal_worker_partition_backlog", *DEPENDENCY_METRICS})
# Figures every worker pod exports alike (each worker measures them all): only ever max'd,
# by the label that tells their series apart.
SAME_IN_EVERY_WORKER = {"pulsecal_worker_partition_backlog": "partition", **DEPENDENCY_METRICS}
# The seed's dashboard sections, as row titles of ours.
SEED_SECTIONS = ("request rate and latency", "error rates", "business", "system", "queue")
# A filebeat `timestamp` processor layout, as a regular expression.
_GO_LAYOUT = {"2006": r"\d{4}", "01": r"\d{2}", "02": r"\d{2}", "15": r"\d{2}", "04": r"\d{2}"}


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def _panels() -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] != "row":
            yield panel


def _dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in _panels() for target in panel["targets"]]


def _metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (by name or by a ``__name__`` regex)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", without_strings))
    for alternatives in re.findall(r'__name__=~"([^"]+)"', expr):
        names.update(alternatives.split("|"))
    return names - {"by", "without", "on", "ignoring", "group_left", "group_right"}


def _promtool(*args: str, cwd: Path = OPS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _prometheus_config(
    directory: Path, targets: list[dict[str, Any]], *, interval: str = "15s"
) -> Path:
    """ops/prometheus.yml as a test can load it: its Kubernetes job on ``targets``."""
    config = _load_yaml(OPS / "prometheus.yml")
    config["global"].update(
        scrape_interval=interval, scrape_timeout="1s", evaluation_interval=interval
    )
    config["rule_files"] = [str(ALERTS)]
    del config["alerting"]  # no Alertmanager here
    token_file = directory / "metrics-token"
    token_file.write_text(TOKEN)
    targets_file = directory / "targets.json"
    targets_file.write_text(json.dumps(targets))
    [job] = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j]
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
    job["scrape_interval"] = interval
    job["authorization"]["credentials_file"] = str(token_file)
    # The static example's hosts do not exist here.
    config["scrape_configs"] = [job]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _pod_target(
    address: str, pod: str, *, port_name: str = "metrics", container: str = "sidecar", **meta: str
) -> dict[str, Any]:
    """A target as Kubernetes pod discovery would give it, before relabelling."""
    labels = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "pulsecal-api",
        "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "pulsecal",
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_container_port_name": port_name,
    }
    labels.update({f"__meta_kubernetes_{k}": v for k, v in meta.items()})
    return {"targets": [address], "labels": labels}


def test_promtool_accepts_the_alert_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_the_alert_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases: dict[str, set[bool]] = collections.defaultdict(set)
    for test in _load_yaml(OPS / "alerts.test.yml")["tests"]:
        for case in test["alert_rule_test"]:
            cases[case["alertname"]].add(bool(case["exp_alerts"]))
    alerts = {rule["alert"] for rule in _rules()}
    assert {"HighErrorRate", "HighLatency", "DatabaseDown"} <= alerts  # the seed's
    assert {name: cases[name] for name in alerts} == {name: {True, False} for name in alerts}


def test_the_alerts_carry_severity_summary_and_description() -> None:
    for rule in _rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def test_high_latency_takes_the_quantile_of_bucket_rates_summed_by_le() -> None:
    [rule] = [r for r in _rules() if r["alert"] == "HighLatency"]
    expr = " ".join(rule["expr"].split())
    assert re.search(
        r"histogram_quantile\(0\.95, sum by \([a-z, ]*\ble\) "
        r"\(rate\(http_request_duration_seconds_bucket\{[^}]*\}\[5m\]\)\)\s*\) > 2",
        expr,
    ), expr


def test_the_operators_prometheusrule_is_in_sync_with_the_alerts() -> None:
    result = subprocess.run(
        [sys.executable, str(OPS / "sync_rules.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rule = _load_yaml(ROOT / "k8s" / "components" / "prometheus-operator" / "prometheusrule.yaml")
    assert rule["spec"]["groups"] == _load_yaml(ALERTS)["groups"]


def test_figures_every_worker_reports_alike_are_taken_once_by_max() -> None:
    exprs = [rule["expr"] for rule in _rules()] + _dashboard_exprs()
    for metric, label in SAME_IN_EVERY_WORKER.items():
        uses = [" ".join(expr.split()) for expr in exprs if metric in _metric_names(expr)]
        assert uses, metric
        for expr in uses:
            # A gauge itself, or a counter's rate or increase, is aggregated.
            selections = re.findall(
                rf"(\w+) by \(([^)]*)\) \((?:(?:rate|increase)\()?{metric}\{{", expr
            )
            assert selections, expr
            assert expr.count(f"{metric}{{") == len(selections), expr
            for aggregation, labels in selections:
                assert aggregation == "max", expr
                assert label in [name.strip() for name in labels.split(",")], expr


def _slugs(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_alert_links_to_its_own_heading_of_the_runbook() -> None:
    for rule in _rules():
        url = rule["annotations"].get("runbook_url")
        assert url == f"docs/runbook.md#{rule['alert'].lower()}", rule["alert"]
        path, _, anchor = url.partition("#")
        page = ROOT / path
        assert page.is_file(), rule["alert"]
        assert anchor in _slugs(page), (rule["alert"], anchor)


def test_every_alert_heading_of_the_runbook_names_an_alert() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    headings = re.findall(r"^### (.+)$", runbook, re.MULTILINE)
    alerts = [rule["alert"] for rule in _rules()]
    assert sorted(headings) == sorted(alerts)
    # Each entry says what it means, what to check first, what to do and when it resolves.
    entries = re.split(r"^#{2,3} ", runbook, flags=re.MULTILINE)
    for alert in alerts:
        [entry] = [e for e in entries if e.startswith(f"{alert}\n")]
        for part in ("**Means**", "**Check first", "**Do", "**Resolves**"):
            assert part in entry, (alert, part)


def test_promtool_accepts_the_scrape_config(tmp_path: Path) -> None:
    config = _prometheus_config(tmp_path, [])
    original = _load_yaml(OPS / "prometheus.yml")
    static = [j for j in original["scrape_configs"] if "static_configs" in j]
    loaded = _load_yaml(config)
    loaded["scrape_configs"].extend(static)
    config.write_text(yaml.safe_dump(loaded))
    result = _promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [j["job_name"] for j in static] == ["pulsecal-api"]


def test_the_dashboard_has_the_seeds_panels_laid_out_on_the_grid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"].lower() for p in dashboard["panels"] if p["type"] == "row"]
    for section in SEED_SECTIONS:
        assert any(section in row for row in rows), section
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "pod"}
    for panel in _panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    metrics = set().union(*map(_metric_names, _dashboard_exprs()))
    for seed_metric in (
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "http_request_errors_total",
        "metrics_ingested_total",
        "alerts_created_total",
        "ai_analysis_completed_total",
        "ai_analysis_failed_total",
        "websocket_connections_active",
        "websocket_messages_total",
        "queue_jobs_active",
        "queue_depth",
        "database_connections_active",
    ):
        assert seed_metric in metrics, seed_metric


def test_filebeat_ships_the_application_log_and_nothing_that_repeats_it() -> None:
    config = _load_yaml(OPS / "filebeat.yml")
    [stream] = config["filebeat.inputs"]
    [path] = stream["paths"]
    pattern = Path(re.sub(r"\$\{LOG_DIR:([^}]+)\}", r"\1", path)).name
    day = 20_000
    shipped = {kind for kind in KINDS if fnmatch.fnmatch(file_name(kind, day), pattern)}
    assert shipped == {"application"}
    for finished in (".gz", ".bz2", ".xz", ".1234.tmp"):
        assert not fnmatch.fnmatch(file_name("application", day) + finished, pattern)
    assert stream["parsers"] == [
        {"ndjson": {"target": "", "overwrite_keys": True, "add_error_key": True}}
    ]
    [timestamp] = [p["timestamp"] for p in config["processors"] if "timestamp" in p]
    assert timestamp["field"] == "timestamp"
    for sample in timestamp["test"]:
        assert _layout_regex(timestamp["layouts"][0]).fullmatch(sample)


def _layout_regex(layout: str) -> re.Pattern[str]:
    text = re.escape(layout)
    text = text.replace(r"\.000", r"\.\d{3}").replace("05", r"\d{2}")
    for part, digits in _GO_LAYOUT.items():
        text = text.replace(part, digits)
    return re.compile(text)


# --- probes of the worker and the analysis service, asked of the running programs ----------


async def _answers(url: str) -> int | None:
    try:
        async with (
            ClientSession(timeout=ClientTimeout(total=1)) as session,
            session.get(url) as response,
        ):
            return response.status
    except (ClientError, TimeoutError):
        return None


@pytest.mark.parametrize(
    ("binary", "port_variable", "paths"),
    [
        pytest.param(
            binary,
            variable,
            paths,
            id=binary.name,
        )
        for binary, variable, paths in (
            (
                WORKER_BIN,
                "WORKER_PORT",
                ("/health/liveness", "/health/readiness", "/health/startup"),
            ),
            (ANALYSIS_BIN, "PORT", ("/health",)),
        )
    ],
)
async def test_the_probe_paths_of_the_manifests_are_served(
    tmp_path: Path,
    migrated: str,
    key_prefix: str,
    binary: Path,
    port_variable: str,
    paths: tuple[str, ...],
) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in _SETTINGS_ENV | {port_variable}},
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": migrated,
        "REDIS_KEY_PREFIX": key_prefix,
        "POD_NAME": "probe-test",
        "LOG_DIR": str(tmp_path),
        port_variable: str(port),
    }
    process = _Process([str(binary)], env=env, log_dir=tmp_path)
    process.start()
    try:
        statuses: dict[str, int | None] = {}
        async with asyncio.timeout(READY_DEADLINE):
            while not all(statuses.get(p) == 200 for p in paths):
                assert process.returncode is None, process.output()
                for path in paths:
                    statuses[path] = await _answers(f"http://127.0.0.1:{port}{path}")
                await asyncio.sleep(0.1)
    finally:
        process.kill()
    assert statuses == dict.fromkeys(paths, 200)


# --- a real Prometheus on two service + sidecar pods -------------------------------------------


class PrometheusProcess(_Process):
    def __init__(self, directory: Path, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            env=os.environ,
            log_dir=directory,
        )

    async def wait_ready(self) -> None:
        async with asyncio.timeout(READY_DEADLINE * 2):
            while await _answers(f"{self.url}/-/ready") != 200:
                assert self.returncode is None, self.output()
                await asyncio.sleep(0.1)

    async def api(self, path: str, **params: str) -> Any:
        async with (
            ClientSession(timeout=ClientTimeout(total=10)) as session,
            session.get(f"{self.url}/api/v1/{path}", params=params) as response,
        ):
            body = await response.json()
        assert body["status"] == "success", (params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def by(self, label: str, expr: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in await self.query(expr)}


@pytest.fixture
def processes() -> Iterator[list[_Process]]:
    started: list[_Process] = []
    yield started
    for process in started:
        process.kill()
        print(f"--- {process.stdout_path}\n{process.output()[-3000:]}")


async def _wait_ready(redis: Redis, keys: Keys, pod: str, service: ServiceProcess) -> None:
    """Ready by its heartbeat, not a probe: every request Prometheus counts is the load's."""
    async with asyncio.timeout(20):
        while True:
            raw = await redis.get(keys.heartbeat(pod))
            if isinstance(raw, bytes) and decode_heartbeat(raw).ready:
                return
            assert service.returncode is None, service.output()
            await asyncio.sleep(0.05)


class Load:
    """Requests of known kinds, and every answer counted by pod and status."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.seq = 0
        self.answers: collections.Counter[tuple[str, str]] = collections.Counter()
        self.ws_acks = 0

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def http(self, session: ClientSession, pod: str, url: str, kind: str) -> int:
        if kind == "valid":
            request = session.post(
                f"{url}/ingestion/ppg",
                json=self.device.batch(self._next_seq()),
                headers=self.device.headers,
            )
        elif kind == "invalid":
            request = session.post(
                f"{url}/ingestion/ppg", json={"seq": "x"}, headers=self.device.headers
            )
        else:
            request = session.get(f"{url}/no/such/{self._next_seq()}")
        async with request as response:
            await response.read()
        self.answers[pod, str(response.status)] += 1
        return response.status

    async def websocket(self, session: ClientSession, url: str, messages: int) -> None:
        async with session.ws_connect(f"{url}/ingestion/ws", headers=self.device.headers) as ws:
            for _ in range(messages):
                await ws.send_str(json.dumps(self.device.batch(self._next_seq())))
                reply = await ws.receive()
                assert reply.type == WSMsgType.TEXT
                assert "ack" in json.loads(reply.data), reply.data
                self.ws_acks += 1


@pytest.mark.timeout(90)
async def test_prometheus_counts_two_pods_exactly_and_evaluates_every_rule_and_panel(
    tmp_path: Path,
    migrated: str,
    key_prefix: str,
    make_device: DeviceFactory,
    redis: Redis,
    keys: Keys,
    processes: list[_Process],
) -> None:
    device = await make_device()  # before the services start, so its token is loaded
    pods = {"api-a": f"{key_prefix.split(':')[1]}-a", "api-b": f"{key_prefix.split(':')[1]}-b"}
    common = {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": migrated,
        "REDIS_KEY_PREFIX": key_prefix,
        "ENABLE_FILE_LOGGING": "true",
        "HEALTH_CHECK_INTERVAL": "0.5",
        "HEALTH_CHECK_TIMEOUT": "1000",
        "HEARTBEAT_INTERVAL": "0.2",
        "HEARTBEAT_TTL": "5",
        "TELEMETRY_FLUSH_INTERVAL": "0.05",
        "BACKLOG_CHECK_INTERVAL": "0.05",
        "SIDECAR_BLOCK_MS": "200",
        "SIDECAR_CHECKPOINT_INTERVAL": "0.2",
        "METRICS_TOKEN": TOKEN,
        # Ingestion is not rate limited here; other routes, shared by both pods through Redis,
        # take 6 requests per client IP, so some of the unknown paths are refused (429).
        "RATE_LIMIT_INGEST_MAX": "1000000",
        "RATE_LIMIT_MAX": "6",
    }
    # Pod b refuses new batches (503) once the shared readings stream holds 50: the load's
    # 5xx make HighErrorRate and ReadingsBacklogFull go pending.
    per_pod = {"api-a": {}, "api-b": {"READINGS_MAX_BACKLOG": "50"}}
    services: dict[str, ServiceProcess] = {}
    sidecars: dict[str, SidecarProcess] = {}
    for name, pod in pods.items():
        config = {**common, **per_pod[name], "POD_NAME": pod}
        services[name] = ServiceProcess(config, log_dir=tmp_path / name / "service")
        sidecars[name] = SidecarProcess(config, log_dir=tmp_path / name / "sidecar")
        processes += [services[name], sidecars[name]]
        services[name].start()
        sidecars[name].start()

    def decoys() -> list[dict[str, Any]]:
        # What pod discovery also finds, and the job's relabelling must drop.
        port = str(services["api-a"].port)
        return [
            _pod_target(f"127.0.0.1:{port}", pods["api-a"], port_name="http", container="service"),
            _pod_target(f"127.0.0.1:{free_port()}", "api-c", pod_phase="Pending"),
            _pod_target(
                f"127.0.0.1:{free_port()}", "other", pod_label_app_kubernetes_io_part_of="other"
            ),
        ]

    targets = [
        _pod_target(f"127.0.0.1:{sidecars[name].port}", pod) for name, pod in pods.items()
    ] + decoys()
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    prometheus = PrometheusProcess(
        prometheus_dir, _prometheus_config(prometheus_dir, targets, interval="1s")
    )
    processes.append(prometheus)
    prometheus.start()
    await asyncio.gather(
        *(_wait_ready(redis, keys, pods[n], services[n]) for n in pods),
        *(sidecar.wait_live() for sidecar in sidecars.values()),
        prometheus.wait_ready(),
    )

    # Prometheus applies discovered targets every 5 s: load only once both are scraped, so the
    # load spans several scrapes (a series scraped once, or born at its final value, has no
    # rate).
    async with asyncio.timeout(20):
        while await prometheus.by("", 'count(up{job="pulsecal-api"} == 1)') != {"": 2.0}:
            await asyncio.sleep(0.2)

    load = Load(device)
    async with ClientSession() as session:
        limit = asyncio.Semaphore(8)

        async def one(name: str, kind: str) -> int:
            async with limit:
                return await load.http(session, pods[name], services[name].url, kind)

        kinds = ["valid"] * 30 + ["invalid"] * 8 + ["unknown"] * 5
        await asyncio.gather(
            *(one(name, kind) for name in pods for kind in kinds),
            load.websocket(session, services["api-a"].url, 12),
        )
        # The stream now holds 72 batches; pod b's guard (50) trips within 0.05 s. The 503s
        # are spread over a few scrapes: a counter born with its final value has no rate.
        refused = 0
        async with asyncio.timeout(10):
            while refused < 25:
                refused += await one("api-b", "valid") == 503
                await asyncio.sleep(0.12)
    sent = sum(load.answers.values())
    assert load.answers[pods["api-a"], "202"] == 30
    assert load.answers[pods["api-b"], "503"] >= 25

    # No double counting: Prometheus's total over both pods is exactly what was sent.
    seen: dict[str, float] = {}
    async with asyncio.timeout(20):
        while seen != {"": sent}:
            await asyncio.sleep(0.3)
            seen = await prometheus.by("", "sum(http_requests_total)")
    by_pod_status = {
        (r["metric"]["pod"], r["metric"]["status"]): float(r["value"][1])
        for r in await prometheus.query("sum by (pod, status) (http_requests_total)")
    }
    assert by_pod_status == {key: float(n) for key, n in load.answers.items()}
    assert await prometheus.by("transport", "sum by (transport) (metrics_ingested_total)") == {
        "http": 4.0 * sum(n for (_, status), n in load.answers.items() if status == "202"),
        "ws": 4.0 * load.ws_acks,
    }
    assert await prometheus.by("", "sum(websocket_messages_total)") == {"": float(load.ws_acks)}
    refused = sum(n for (_, status), n in load.answers.items() if status == "429")
    assert refused > 0
    assert await prometheus.by(
        "", 'sum(rate_limit_rejections_total{mode="enforced", route="unmatched"})'
    ) == {"": float(refused)}

    # The Kubernetes job's relabelling: the two sidecars, labelled as the rules expect.
    active = await prometheus.api("targets", state="active")
    assert sorted(
        (t["labels"]["job"], t["labels"]["namespace"], t["labels"]["pod"], t["health"])
        for t in active["activeTargets"]
    ) == sorted(("pulsecal-api", NAMESPACE, pod, "up") for pod in pods.values())
    dropped = await prometheus.api("targets", state="dropped")
    assert len(dropped["droppedTargets"]) == 3

    # Let the rules evaluate on the complete data, then: every rule healthy, and the alerts
    # this load should set off pending (their `for` has not run out), no other.
    await asyncio.sleep(2.5)
    groups = (await prometheus.api("rules"))["groups"]
    evaluated = [rule for group in groups for rule in group["rules"]]
    assert len(evaluated) == len(_rules())
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in evaluated] == [
        (r["name"], "ok", "") for r in evaluated
    ]
    active_alerts = {
        (a["labels"]["alertname"], a["state"], a["labels"].get("namespace"))
        for a in (await prometheus.api("alerts"))["alerts"]
    }
    assert active_alerts == {
        ("HighErrorRate", "pending", NAMESPACE),
        ("ReadingsBacklogFull", "pending", NAMESPACE),
    }

    # Every rule expression evaluates, and every metric it uses has data (but the planned).
    exported = {
        r["metric"]["__name__"]
        for r in await prometheus.query('count by (__name__) ({__name__=~".+"})')
    }
    for rule in _rules():
        await prometheus.query(rule["expr"])
        missing = _metric_names(rule["expr"]) - exported - PLANNED_METRICS - WORKER_METRICS
        assert not missing, (rule["alert"], missing)

    # Every dashboard expression evaluates and has data, but those of planned metrics and of
    # the worker (not running here).
    for expr in _dashboard_exprs():
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace('"$namespace"', '".*"')
            .replace('"$pod"', '".*"')
        )
        result = await prometheus.query(concrete)
        expect_empty = (
            bool(_metric_names(expr) & (PLANNED_METRICS | WORKER_METRICS))
            or 'job="pulsecal-worker"' in expr
        )
        assert bool(result) != expect_empty, expr
    for variable in ("namespace", "pod"):
        values = await prometheus.by(variable, f"count by ({variable}) (pulsecal_service_up)")
        expected = {NAMESPACE} if variable == "namespace" else set(pods.values())
        assert set(values) == expected

    # The log files Filebeat would ship: found by its glob, one JSON object a line, with the
    # timestamp its processor parses.
    filebeat = _load_yaml(OPS / "filebeat.yml")
    [glob] = filebeat["filebeat.inputs"][0]["paths"]
    [timestamp] = [p["timestamp"] for p in filebeat["processors"] if "timestamp" in p]
    layout = _layout_regex(timestamp["layouts"][0])
    for name in pods:
        log_dir = tmp_path / name / "service"
        files = sorted(log_dir.glob(Path(re.sub(r"\$\{LOG_DIR:[^}]+\}", "", glob)).name))
        assert files, list(log_dir.iterdir())
        for line in files[0].read_text().splitlines():
            record = json.loads(line)
            assert layout.fullmatch(record["timestamp"]), record["timestamp"]

    for process in processes[:-1]:
        assert "Traceback" not in process.output(), process.output()
