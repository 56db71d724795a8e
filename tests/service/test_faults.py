"""Redis failing under load: refusals instead of errors, no acknowledged batch lost, recovery.

The service runs as a real process against a redis-server of the test's own, which fsyncs
every write (so what it acknowledged survives ``kill -9``). Devices keep sending while Redis
is killed or frozen; every batch must be either acknowledged (and then stored) or refused
with a retry hint, and the service must come back by itself once Redis does.
"""

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import msgspec
import pytest
from aiohttp import ClientSession, ClientTimeout, ClientWebSocketResponse, WSMsgType
from redis.asyncio import Redis

from shared.keys import Keys
from tests.support.env import Device, DeviceFactory
from tests.support.outcomes import Outcome, send_http
from tests.support.procs import RedisServer, ServiceProcess, free_port
from tests.support.readings import stored_batches

WRITE_TIMEOUT = 0.5
# A batch may wait for the write in flight before its own write starts: two timeouts, plus
# scheduling slack on a loaded machine.
REFUSAL_BOUND = 2 * WRITE_TIMEOUT + 0.5
KEY_PREFIX = "faults:"
HTTP_SENDERS = 20
WS_SENDERS = 3
PACE = 0.02  # seconds between one sender's batches


async def send_ws(ws: ClientWebSocketResponse, device: Device, seq: int) -> Outcome:
    started = time.monotonic()
    await ws.send_str(msgspec.json.encode(device.batch(seq)).decode())
    message = await ws.receive(timeout=10)
    ended = time.monotonic()
    if message.type is not WSMsgType.TEXT:
        detail = f"{message.type.name} {message.data!r}"
        return Outcome(device.device_id, seq, "ws", started, ended, 0, detail=detail)
    reply = msgspec.json.decode(message.data)
    if reply.get("ack") == seq:
        status, retry_after = 202, None
    elif reply.get("seq") == seq and "error" in reply:
        status = reply["error"]["status"]
        retry_after = (
            str(reply["error"]["retry_after"]) if "retry_after" in reply["error"] else None
        )
    else:
        status, retry_after = 0, None
    return Outcome(device.device_id, seq, "ws", started, ended, status, retry_after, message.data)


@contextlib.asynccontextmanager
async def device_load(
    session: ClientSession, url: str, http_devices: list[Device], ws_devices: list[Device]
) -> AsyncIterator[list[Outcome]]:
    """Every device sends its next batch as soon as the last one was answered (paced)."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def http_sender(device: Device) -> None:
        seq = 0
        while not stop.is_set():
            outcomes.append(await send_http(session, url, device, seq))
            seq += 1
            await asyncio.sleep(PACE)

    async def ws_sender(device: Device) -> None:
        headers = {"Authorization": device.headers["Authorization"]}
        async with session.ws_connect(f"{url}/ingestion/ws", headers=headers) as ws:
            seq = 0
            while not stop.is_set():
                outcome = await send_ws(ws, device, seq)
                outcomes.append(outcome)
                if outcome.status == 0:
                    return  # the connection is gone; the outcome fails the test
                seq += 1
                await asyncio.sleep(PACE)

    async with asyncio.TaskGroup() as senders:
        for device in http_devices:
            senders.create_task(http_sender(device))
        for device in ws_devices:
            senders.create_task(ws_sender(device))
        try:
            yield outcomes
        finally:
            stop.set()


async def answers(session: ClientSession, url: str) -> int:
    async with session.get(url) as response:
        return response.status


async def wait_for_status(session: ClientSession, url: str, status: int) -> None:
    """Poll ``url`` until it answers ``status`` (bound it with ``asyncio.timeout``)."""
    while await answers(session, url) != status:
        await asyncio.sleep(0.05)


async def wait_for_acks(outcomes: list[Outcome], *, since: float, count: int) -> None:
    """Until ``count`` batches sent after ``since`` were acknowledged."""
    async with asyncio.timeout(10):
        while sum(o.status == 202 and o.started >= since for o in outcomes) < count:
            await asyncio.sleep(0.05)


async def retry_all(
    session: ClientSession, url: str, refused: Iterable[Outcome], devices: dict[str, Device]
) -> list[Outcome]:
    """What a device does with a refused batch: send it again, here over HTTP."""
    limit = asyncio.Semaphore(20)

    async def retry(outcome: Outcome) -> Outcome:
        async with limit:
            return await send_http(session, url, devices[outcome.device_id], outcome.seq)

    return list(await asyncio.gather(*(retry(o) for o in refused)))


async def stored_batch_counts(redis_url: str) -> Counter[tuple[str, int]]:
    client = Redis.from_url(redis_url)
    try:
        batches = await stored_batches(client, Keys(KEY_PREFIX))
    finally:
        await client.aclose()
    return Counter((batch["device_id"], batch["seq"]) for batch in batches)


def failures_in(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """Outcomes that are neither an ack nor a refusal that tells the device when to retry."""
    return [
        o for o in outcomes if not (o.status == 202 or (o.status == 503 and o.retry_after == "1"))
    ]


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", port=free_port())
    try:
        server.start()
        await server.wait_ready()
        yield server
    finally:
        server.kill()


@pytest.fixture
async def devices(make_device: DeviceFactory) -> list[Device]:
    return [await make_device() for _ in range(HTTP_SENDERS + WS_SENDERS)]


@pytest.fixture
async def service(
    redis_server: RedisServer, migrated: str, devices: list[Device], tmp_path: Path
) -> AsyncIterator[ServiceProcess]:
    """The service, started after ``devices`` were registered so their tokens are loaded."""
    process = ServiceProcess(
        {
            "REDIS_URL": redis_server.url,
            "DATABASE_URL": migrated,
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "POD_NAME": "fault-pod",
            "WRITE_TIMEOUT": str(WRITE_TIMEOUT),
            "HEALTH_CHECK_INTERVAL": "0.2",
            "HEALTH_CHECK_TIMEOUT": "500",
            "RETRY_AFTER": "1",
            "TOKEN_REFRESH_INTERVAL": "0.5",
            # Every retry in these tests must be recognised, however many batches came since.
            "IDEMPOTENCY_WINDOW": "100000",
            "SHUTDOWN_TIMEOUT": "2",
        },
        log_dir=tmp_path / "service",
    )
    try:
        process.start()
        await process.wait_started()
        yield process
    finally:
        process.kill()
        print(process.output())  # shown with a failure


async def test_redis_killed_mid_load_refuses_with_503_keeps_every_ack_and_recovers(
    service: ServiceProcess, redis_server: RedisServer, devices: list[Device]
) -> None:
    http_devices, ws_devices = devices[:HTTP_SENDERS], devices[HTTP_SENDERS:]
    readiness = f"{service.url}/health/readiness"
    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        async with device_load(session, service.url, http_devices, ws_devices) as outcomes:
            await wait_for_acks(outcomes, since=0, count=100)
            redis_server.kill()
            killed_at = time.monotonic()
            async with asyncio.timeout(5):
                await wait_for_status(session, readiness, 503)
            liveness_in_outage = await answers(session, f"{service.url}/health/liveness")
            await asyncio.sleep(1.0)  # devices keep sending into the outage
            restarted_at = time.monotonic()
            redis_server.start()
            await redis_server.wait_ready()
            async with asyncio.timeout(10):
                await wait_for_status(session, readiness, 200)
            await wait_for_acks(outcomes, since=time.monotonic(), count=100)
        refused = [o for o in outcomes if o.status == 503]
        retries = await retry_all(session, service.url, refused, {d.device_id: d for d in devices})

    during_outage = [o for o in outcomes if killed_at <= o.started and o.ended <= restarted_at]
    assert failures_in(outcomes) == []
    assert liveness_in_outage == 200
    assert len(during_outage) > 0
    assert {o.status for o in during_outage} == {503}
    assert {o.transport for o in during_outage} == {"http", "ws"}
    assert [o for o in retries if o.status != 202] == []
    acked = {o.batch for o in [*outcomes, *retries] if o.status == 202}
    stored = await stored_batch_counts(redis_server.url)
    assert {batch: stored[batch] for batch in acked if stored[batch] != 1} == {}
    assert {batch: n for batch, n in stored.items() if n > 1} == {}
    assert service.returncode is None
    assert service.logged_errors() == []


async def test_frozen_redis_gets_503_within_the_write_timeout_and_recovers(
    service: ServiceProcess, redis_server: RedisServer, devices: list[Device]
) -> None:
    http_devices, ws_devices = devices[:10], devices[HTTP_SENDERS:]
    readiness = f"{service.url}/health/readiness"
    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        try:
            async with device_load(session, service.url, http_devices, ws_devices) as outcomes:
                await wait_for_acks(outcomes, since=0, count=100)
                redis_server.pause()
                paused_at = time.monotonic()
                async with asyncio.timeout(5):
                    await wait_for_status(session, readiness, 503)
                await asyncio.sleep(1.5)  # well past the write timeout: nothing may hang
                resumed_at = time.monotonic()
                redis_server.resume()
                async with asyncio.timeout(10):
                    await wait_for_status(session, readiness, 200)
                await wait_for_acks(outcomes, since=time.monotonic(), count=100)
        finally:
            redis_server.resume()
        refused = [o for o in outcomes if o.status == 503]
        retries = await retry_all(session, service.url, refused, {d.device_id: d for d in devices})

    during_freeze = [o for o in outcomes if paused_at <= o.started and o.ended <= resumed_at]
    assert failures_in(outcomes) == []
    assert len(during_freeze) > 0
    assert {o.status for o in during_freeze} == {503}
    assert [o for o in outcomes if o.ended - o.started > REFUSAL_BOUND] == []
    assert [o for o in retries if o.status != 202] == []
    acked = {o.batch for o in [*outcomes, *retries] if o.status == 202}
    stored = await stored_batch_counts(redis_server.url)
    assert {batch: stored[batch] for batch in acked if stored[batch] != 1} == {}
    assert {batch: n for batch, n in stored.items() if n > 1} == {}
    assert service.returncode is None
    assert service.logged_errors() == []
