"""The sidecar as a real process, scraped by a real Prometheus, restarted under load."""

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import ClientSession
from redis.asyncio import Redis

from shared.keys import Keys
from shared.telemetry import decode_heartbeat
from tests.support.env import REDIS_URL, Device, DeviceFactory
from tests.support.procs import ServiceProcess
from tests.support.sidecar import (
    PrometheusServer,
    SidecarProcess,
    http_record,
    scrape,
    total,
    xadd_batch,
)

TOKEN = "scrape-token-for-tests"  # noqa: S105 - the test's own token, not a secret


@pytest.fixture
def pod(key_prefix: str) -> str:
    return f"pod-{key_prefix.split(':')[1]}"


@pytest.fixture
def config(migrated: str, key_prefix: str, pod: str) -> dict[str, str]:
    """What the service and its sidecar share, as in one Kubernetes pod."""
    return {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": migrated,
        "REDIS_KEY_PREFIX": key_prefix,
        "POD_NAME": pod,
        "HEALTH_CHECK_INTERVAL": "0.5",
        "HEALTH_CHECK_TIMEOUT": "1000",
        "HEARTBEAT_INTERVAL": "0.2",
        "HEARTBEAT_TTL": "5",
        "TELEMETRY_FLUSH_INTERVAL": "0.05",
        "SIDECAR_BLOCK_MS": "200",
        "SIDECAR_CHECKPOINT_INTERVAL": "0.2",
        "METRICS_TOKEN": TOKEN,
    }


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess | ServiceProcess | PrometheusServer]]:
    """Whatever a test starts is killed after it, and its output shown if the test failed."""
    started: list[SidecarProcess | ServiceProcess | PrometheusServer] = []
    yield started
    for process in started:
        process.kill()
        print(f"--- {process.stdout_path.parent.name}\n{process.output()[-5000:]}")


async def wait_service_ready(redis: Redis, keys: Keys, pod: str, service: ServiceProcess) -> None:
    """Ready by its heartbeat, not by a probe: every HTTP request it counts is the test's."""
    async with asyncio.timeout(20):
        while True:
            raw = await redis.get(keys.heartbeat(pod))
            if isinstance(raw, bytes) and decode_heartbeat(raw).ready:
                return
            if service.returncode is not None:
                raise RuntimeError(service.output())
            await asyncio.sleep(0.05)


async def send_requests(
    url: str, device: Device, *, valid: int, invalid: int, done: list[int]
) -> int:
    """Valid and invalid batches and unknown paths, paced over ~2 s; how many were sent.

    ``done[0]`` counts the answered ones as they come, so a test can act mid-load.
    """
    limit = asyncio.Semaphore(8)

    async def one(session: ClientSession, n: int) -> None:
        async with limit:
            if n < valid:
                request = session.post(
                    f"{url}/ingestion/ppg", json=device.batch(n), headers=device.headers
                )
            elif n < valid + invalid:
                request = session.post(
                    f"{url}/ingestion/ppg", json={"seq": "x"}, headers=device.headers
                )
            else:
                request = session.get(f"{url}/no/such/{n}")
            async with request as response:
                await response.read()
            done[0] += 1
            await asyncio.sleep(0.1)

    count = valid + invalid + 10
    async with ClientSession() as session:
        await asyncio.gather(*(one(session, n) for n in range(count)))
    return count


@pytest.mark.timeout(90)
async def test_prometheus_counts_exactly_the_requests_sent_across_a_sidecar_restart(
    tmp_path: Path,
    make_device: DeviceFactory,
    config: dict[str, str],
    redis: Redis,
    keys: Keys,
    pod: str,
    processes: list[SidecarProcess | ServiceProcess | PrometheusServer],
) -> None:
    device = await make_device()  # before the service starts, so its token is loaded
    service = ServiceProcess(config, log_dir=tmp_path / "service")
    processes.append(service)
    service.start()
    sidecar = SidecarProcess(config, log_dir=tmp_path / "sidecar-1")
    processes.append(sidecar)
    sidecar.start()
    prometheus = PrometheusServer(
        tmp_path / "prometheus", targets=[f"127.0.0.1:{sidecar.port}"], bearer_token=TOKEN
    )
    processes.append(prometheus)
    prometheus.start()
    await asyncio.gather(
        wait_service_ready(redis, keys, pod, service), sidecar.wait_live(), prometheus.wait_ready()
    )

    done = [0]
    load = asyncio.create_task(send_requests(service.url, device, valid=120, invalid=20, done=done))
    await asyncio.sleep(0.5)
    answered_before_stop = done[0]
    sidecar.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await sidecar.exited() == 0
    restarted = SidecarProcess(config, log_dir=tmp_path / "sidecar-2", port=sidecar.port)
    processes.append(restarted)
    restarted.start()
    await restarted.wait_live()
    answered_before_restart = done[0]
    sent = await load

    assert 0 < answered_before_stop <= answered_before_restart < sent, "not a restart mid-load"

    async def prometheus_total() -> float | None:
        return await prometheus.query_value("sum(http_requests_total)")

    seen: float | None = None
    async with asyncio.timeout(20):
        while seen != sent:
            await asyncio.sleep(0.5)
            seen = await prometheus_total()
            scraped = await scrape(restarted.url, token=TOKEN)
            assert total(scraped, "http_requests_total") <= sent, "counted twice"

    assert seen == sent
    assert await prometheus.query_value('sum(http_requests_total{status="202"})') == 120
    assert await prometheus.query_value("sum(http_request_errors_total)") == 30
    assert await prometheus.query_value("sum(metrics_ingested_total)") == 120 * 4
    assert not service.logged_errors()
    assert "Traceback" not in sidecar.output() + restarted.output()


@pytest.mark.timeout(60)
async def test_a_killed_sidecar_resumes_without_losing_or_double_counting(
    tmp_path: Path,
    config: dict[str, str],
    redis: Redis,
    keys: Keys,
    pod: str,
    processes: list[SidecarProcess | ServiceProcess | PrometheusServer],
) -> None:
    sidecar = SidecarProcess(config, log_dir=tmp_path / "sidecar-1")
    processes.append(sidecar)
    sidecar.start()
    await sidecar.wait_live()

    async def write(batches: int) -> int:
        for _ in range(batches):
            await xadd_batch(redis, keys, pod, [http_record()] * 25)
            await asyncio.sleep(0.005)
        return batches * 25

    writing = asyncio.create_task(write(200))
    scraped_before = 0.0
    for _ in range(5):
        await asyncio.sleep(0.1)
        scraped_before = total(await scrape(sidecar.url, token=TOKEN), "http_requests_total")
    sidecar.kill()  # SIGKILL mid-load: no final checkpoint
    assert not writing.done(), "not a kill mid-load"
    restarted = SidecarProcess(config, log_dir=tmp_path / "sidecar-2", port=sidecar.port)
    processes.append(restarted)
    restarted.start()
    await restarted.wait_live()
    first_after = total(await scrape(restarted.url, token=TOKEN), "http_requests_total")
    written = await writing

    scraped = 0.0
    async with asyncio.timeout(15):
        while scraped != written:
            await asyncio.sleep(0.1)
            scraped = total(await scrape(restarted.url, token=TOKEN), "http_requests_total")
            assert scraped <= written, "counted twice"

    assert 0 < scraped_before <= first_after  # never below what a scrape had shown
    await asyncio.sleep(0.5)
    assert total(await scrape(restarted.url, token=TOKEN), "http_requests_total") == written


@pytest.mark.timeout(60)
async def test_prometheus_stores_the_exemplars_of_sampled_requests(
    tmp_path: Path,
    config: dict[str, str],
    redis: Redis,
    keys: Keys,
    pod: str,
    processes: list[SidecarProcess | ServiceProcess | PrometheusServer],
) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    await xadd_batch(redis, keys, pod, [http_record(duration_us=1500, trace_id=trace)])
    sidecar = SidecarProcess(config, log_dir=tmp_path / "sidecar")
    processes.append(sidecar)
    sidecar.start()
    prometheus = PrometheusServer(
        tmp_path / "prometheus", targets=[f"127.0.0.1:{sidecar.port}"], bearer_token=TOKEN
    )
    processes.append(prometheus)
    prometheus.start()
    await asyncio.gather(sidecar.wait_live(), prometheus.wait_ready())

    found: list[object] = []
    async with asyncio.timeout(20):
        while not found:
            await asyncio.sleep(0.5)
            data = await prometheus.api(
                "query_exemplars",
                query="http_request_duration_seconds_bucket",
                start="0",
                end="4102444800",
            )
            assert isinstance(data, list)
            found = [e for series in data for e in series["exemplars"]]

    assert [e["labels"] for e in found] == [{"trace_id": trace}]  # type: ignore[index]
