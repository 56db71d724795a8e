"""A pod replaced: its service and sidecar stop, a pod of another name takes over, and a real
worker removes the old pod's keys once it has been gone for ``POD_KEYS_GRACE``."""

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from tests.support.env import REDIS_URL
from tests.support.procs import ServiceProcess
from tests.support.sidecar import SidecarProcess
from tests.support.worker import WorkerProcess, eventually, worker_config

GRACE = 3

Process = ServiceProcess | SidecarProcess | WorkerProcess


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()
        print(f"--- {process.stdout_path.parent.name}\n{process.output()[-5000:]}")


def pod_config(keys: Keys, database_url: str, pod: str) -> dict[str, str]:
    return {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": database_url,
        "REDIS_KEY_PREFIX": keys.prefix,
        "POD_NAME": pod,
        "HEALTH_CHECK_INTERVAL": "0.5",
        "HEALTH_CHECK_TIMEOUT": "1000",
        "HEARTBEAT_INTERVAL": "0.2",
        "HEARTBEAT_TTL": "1",
        "TELEMETRY_FLUSH_INTERVAL": "0.05",
        "SIDECAR_BLOCK_MS": "200",
        "SIDECAR_CHECKPOINT_INTERVAL": "0.2",
        "SHUTDOWN_TIMEOUT": "2",
    }


async def start_pod(
    keys: Keys, database_url: str, pod: str, tmp_path: Path, processes: list[Process]
) -> tuple[ServiceProcess, SidecarProcess]:
    config = pod_config(keys, database_url, pod)
    service = ServiceProcess(config, log_dir=tmp_path / f"{pod}-service")
    sidecar = SidecarProcess(config, log_dir=tmp_path / f"{pod}-sidecar")
    processes += [service, sidecar]
    service.start()
    sidecar.start()
    await asyncio.gather(service.wait_started(), sidecar.wait_live())
    return service, sidecar


async def test_a_replaced_pods_keys_go_and_the_live_ones_stay(
    redis: Redis, keys: Keys, migrated: str, tmp_path: Path, processes: list[Process]
) -> None:
    old_service, old_sidecar = await start_pod(keys, migrated, "pod-old", tmp_path, processes)

    async def has_all_keys(pod: str) -> bool:
        return all([await redis.exists(key) for key in keys.pod_keys(pod)])

    await eventually(lambda: has_all_keys("pod-old"), within=15)
    worker = WorkerProcess(
        {
            **worker_config(keys, migrated, "pod-worker"),
            "HEARTBEAT_INTERVAL": "0.2",
            "HEARTBEAT_TTL": "1",
            "POD_KEYS_GRACE": str(GRACE),
        },
        log_dir=tmp_path / "worker",
    )
    processes.append(worker)
    worker.start()
    await worker.wait_started()

    # The rollout: the new pod starts, the old one is stopped.
    await start_pod(keys, migrated, "pod-new", tmp_path, processes)
    for process in (old_service, old_sidecar):
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.exited() == 0
    stopped = asyncio.get_running_loop().time()

    async def old_gone() -> bool:
        return not any([await redis.exists(key) for key in keys.pod_keys("pod-old")])

    await eventually(old_gone, within=GRACE + 10)
    assert asyncio.get_running_loop().time() - stopped >= GRACE - 1  # not before the grace
    assert await redis.zscore(keys.pods_seen, "pod-old") is None
    assert any("pod pod-old gone" in line for line in worker.logged("info"))

    # The live pods keep everything, however long the test waits.
    await asyncio.sleep(GRACE + 1)
    assert await has_all_keys("pod-new")
    assert await redis.exists(keys.heartbeat("pod-worker"))
    assert sorted(await redis.zrange(keys.pods_seen, 0, -1)) == [b"pod-new", b"pod-worker"]
