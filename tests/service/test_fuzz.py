"""Schemathesis against the running service, from the OpenAPI document it serves.

The service runs as a real process (real Redis, real Postgres). Schemathesis's engine (what
its CLI runs) reads ``GET /openapi.json`` and sends what it derives from it: the documented
examples, the schema's boundaries (coverage phase), then random valid and invalid requests
(fuzzing phase), with probes and unsupported methods. Every answer is checked: no 5xx, the
status documented, its content type and body as documented, documented headers present,
invalid input refused, valid input accepted, an operation that needs a token refusing a
request without one. The service must log no error meanwhile (a client's fault is at most a
warning).

Once with valid tokens (a device's for ingestion, the operators' for ``/alerts``, the
health one for the probes' details; rate limits out of the way, so every request reaches
validation and storage), once without any (default rate limits: 401s, then 429s).
``MAX_EXAMPLES`` bounds each phase per operation; the seed is fixed so a failure comes back
on the next run. Counts go to stdout (``-s``) and to
``tests/artifacts/fuzz-summary-<run>.json``.
"""

import asyncio
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import StopReason, events, from_schema

from tests.support.env import Device
from tests.support.paths import ROOT_DIR
from tests.support.procs import ServiceProcess

MAX_EXAMPLES = 300
SEED = 20_251_206
ARTIFACTS = ROOT_DIR / "tests" / "artifacts"
ADMIN_TOKEN = "op-" + uuid.uuid4().hex
HEALTH_TOKEN = "health-" + uuid.uuid4().hex
UNLIMITED = "10000000"


@dataclass
class Tally:
    """What one run sent and got back, per operation."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    checks: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop_reason: str = ""

    def add(self, finished: events.ScenarioFinished) -> None:
        recorder = finished.recorder
        for interaction in recorder.interactions.values():
            self.cases[recorder.label] += 1
            if interaction.response is not None:
                self.statuses[recorder.label][interaction.response.status_code] += 1
        for checks in recorder.checks.values():
            for check in checks:
                self.checks[f"{check.name}:{check.status.value}"] += 1
                if check.failure_info is not None:
                    failure = check.failure_info.failure
                    self.failures.append(
                        f"{recorder.label} [{check.name}] {failure.title}: {failure.message}\n"
                        f"    {check.failure_info.code_sample}"
                    )

    def summary(self) -> dict[str, Any]:
        return {
            "stop_reason": self.stop_reason,
            "cases": sum(self.cases.values()),
            "operations": {
                label: {
                    "cases": count,
                    "statuses": {str(s): n for s, n in sorted(self.statuses[label].items())},
                }
                for label, count in sorted(self.cases.items())
            },
            "server_errors": sum(
                n for counts in self.statuses.values() for s, n in counts.items() if s >= 500
            ),
            "checks": dict(sorted(self.checks.items())),
            "failures": sorted(set(self.failures)),
            "errors": self.errors,
        }


def fuzz(url: str, config: dict[str, Any]) -> Tally:
    """One engine run over the document ``url`` serves; blocking (run it in a thread)."""
    settings = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "workers": 1,
            "continue-on-failure": True,
            "request-timeout": 10,
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none", "no-shrink": True},
            # No links between operations to follow.
            "phases": {"stateful": {"enabled": False}},
            "operations": [
                {
                    # A request schemathesis sees as valid lacks the handshake's headers
                    # (the document cannot say them): refused with 400, as it should be.
                    "include-operation-id": "ingestWebSocket",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["101", "400", "401", "429"]
                        }
                    },
                }
            ],
            **config,
        }
    )
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=settings)
    tally = Tally()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tally.add(event)
        elif isinstance(event, events.NonFatalError):
            tally.errors.append(f"{event.label}: {event.info}")
        elif isinstance(event, events.FatalError):
            tally.errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            tally.stop_reason = event.stop_reason.value
    return tally


def report(run: str, tally: Tally) -> dict[str, Any]:
    summary = tally.summary()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"fuzz-summary-{run}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nfuzz {run}: {summary['cases']} cases, stopped: {summary['stop_reason']}")
    for label, counts in summary["operations"].items():
        print(f"  {label}: {counts['cases']} cases, statuses {counts['statuses']}")
    return summary


@pytest.fixture
async def service(
    migrated: str, key_prefix: str, device: Device, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceProcess]:
    limits: dict[str, str] = getattr(request, "param", {})
    process = ServiceProcess(
        {
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "DATABASE_URL": migrated,
            "REDIS_KEY_PREFIX": key_prefix,
            "POD_NAME": f"fuzz-{uuid.uuid4().hex[:8]}",
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "HEALTH_DETAIL_TOKEN": HEALTH_TOKEN,
            "HEALTH_CHECK_INTERVAL": "0.5",
            **limits,
        },
        log_dir=tmp_path / "service",
    )
    try:
        process.start()
        await process.wait_started()
        yield process
    finally:
        process.kill()


def assert_clean(tally: Tally, summary: dict[str, Any], process: ServiceProcess) -> None:
    assert tally.stop_reason == StopReason.COMPLETED.value, summary
    assert summary["server_errors"] == 0, summary["operations"]
    assert tally.errors == []
    assert process.logged_errors() == []
    assert summary["failures"] == [], "\n".join(summary["failures"])


@pytest.mark.parametrize(
    "service",
    [
        {
            "RATE_LIMIT_MAX": UNLIMITED,
            "RATE_LIMIT_INGEST_MAX": UNLIMITED,
            "RATE_LIMIT_BURST_MAX": "0",
        }
    ],
    indirect=True,
)
async def test_fuzzing_with_valid_tokens_breaks_no_documented_contract(
    service: ServiceProcess, device: Device
) -> None:
    config = {
        "auth": {
            "openapi": {
                "deviceToken": {"bearer": device.token},
                "operatorToken": {"bearer": ADMIN_TOKEN},
                "healthToken": {"bearer": HEALTH_TOKEN},
            }
        },
        # A batch is accepted only from its own device's token.
        "parameters": {"body.device_id": device.device_id},
    }
    tally = await asyncio.to_thread(fuzz, service.url, config)
    summary = report("with-tokens", tally)

    assert summary["operations"]["POST /ingestion/ppg"]["statuses"].get("202", 0) > 0
    assert summary["operations"]["GET /alerts"]["statuses"].get("200", 0) > 0
    assert_clean(tally, summary, service)


async def test_fuzzing_without_tokens_breaks_no_documented_contract(
    service: ServiceProcess,
) -> None:
    # The address's rate limit is checked before the token is read: once its budget is
    # spent, a request without a token is 429, where this check wants nothing but 401 (the
    # run with tokens, unlimited, makes it).
    config = {"checks": {"missing_required_header": {"enabled": False}}}
    tally = await asyncio.to_thread(fuzz, service.url, config)
    summary = report("without-tokens", tally)

    statuses = summary["operations"]["POST /ingestion/ppg"]["statuses"]
    assert set(statuses) <= {"401", "405", "429"}, statuses
    assert_clean(tally, summary, service)
