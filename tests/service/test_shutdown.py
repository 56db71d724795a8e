"""SIGTERM drains: in-flight batches are answered and stored, sockets close cleanly, exit 0.

The service runs as a real process (the signal handling and the exit are what is tested)
against the machine's Redis under the test's own key prefix.
"""

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import msgspec
import pytest
from aiohttp import (
    ClientConnectorError,
    ClientError,
    ClientSession,
    ClientTimeout,
    ClientWebSocketResponse,
    WSCloseCode,
    WSMsgType,
    web,
)
from redis.asyncio import Redis

from shared.keys import Keys
from shared.telemetry import Kind, ServiceHeartbeat, decode_batch, decode_heartbeat
from tests.support.env import REDIS_URL, Device, DeviceFactory
from tests.support.procs import RedisProxy, ServiceProcess
from tests.support.readings import stored_batches

PPG_ROUTE = "/ingestion/ppg"
EXIT_DEADLINE = 20.0
# redis-py types stream entries as Optional throughout; without decode_responses they are:
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


class StartService(Protocol):
    async def __call__(self, redis_url: str, **config: str) -> ServiceProcess: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one batch; ``status`` None means no answer (the connection was gone)."""

    device_id: str
    seq: int
    ended: float
    status: int | None
    detail: str = ""

    @property
    def batch(self) -> tuple[str, int]:
        return self.device_id, self.seq


async def post_batch(session: ClientSession, url: str, device: Device, seq: int) -> Reply:
    try:
        async with session.post(
            f"{url}{PPG_ROUTE}", data=msgspec.json.encode(device.batch(seq)), headers=device.headers
        ) as response:
            status, detail = response.status, await response.text()
    except ClientError as e:
        status, detail = None, repr(e)
    return Reply(device.device_id, seq, time.monotonic(), status, detail)


async def send_until_refused(
    session: ClientSession, url: str, device: Device, replies: list[Reply]
) -> None:
    """One device posting batch after batch until the service stops answering."""
    seq = 0
    while True:
        reply = await post_batch(session, url, device, seq)
        replies.append(reply)
        if reply.status is None:
            return
        seq += 1


async def stream_until_closed(
    ws: ClientWebSocketResponse, device: Device, replies: list[Reply]
) -> None:
    """One device sending batch after batch over its WebSocket until the server closes it."""
    seq = 0
    while True:
        try:
            await ws.send_str(msgspec.json.encode(device.batch(seq)).decode())
        except ConnectionError:
            return
        message = await ws.receive(timeout=10)
        if message.type is not WSMsgType.TEXT:
            return
        reply = msgspec.json.decode(message.data)
        status = 202 if reply.get("ack") == seq else reply.get("error", {}).get("status", 0)
        replies.append(Reply(device.device_id, seq, time.monotonic(), status, message.data))
        seq += 1


async def connect(
    session: ClientSession, service: ServiceProcess, device: Device
) -> ClientWebSocketResponse:
    headers = {"Authorization": device.headers["Authorization"]}
    return await session.ws_connect(f"{service.url}/ingestion/ws", headers=headers)


async def received_until_closed(ws: ClientWebSocketResponse) -> list[object]:
    """The decoded text messages a WebSocket receives, then its close code."""
    received: list[object] = []
    while (message := await ws.receive(timeout=15)).type is WSMsgType.TEXT:
        received.append(msgspec.json.decode(message.data))
    received.append(ws.close_code)
    return received


async def stored_batch_counts(redis: Redis, keys: Keys) -> Counter[tuple[str, int]]:
    batches = await stored_batches(redis, keys)
    return Counter((batch["device_id"], batch["seq"]) for batch in batches)


async def heartbeat(redis: Redis, keys: Keys, pod: str) -> ServiceHeartbeat | None:
    raw = cast(bytes | None, await redis.get(keys.heartbeat(pod)))
    if raw is None:
        return None
    beat = decode_heartbeat(raw)
    assert isinstance(beat, ServiceHeartbeat)
    return beat


async def wait_for_heartbeat(
    redis: Redis, keys: Keys, pod: str, condition: Callable[[ServiceHeartbeat], bool]
) -> ServiceHeartbeat:
    async with asyncio.timeout(10):
        while (beat := await heartbeat(redis, keys, pod)) is None or not condition(beat):
            await asyncio.sleep(0.02)
    return beat


@pytest.fixture
def pod(key_prefix: str) -> str:
    return f"pod-{key_prefix.split(':')[1]}"


@pytest.fixture
def start_service(
    migrated: str, key_prefix: str, pod: str, tmp_path: Path
) -> Iterator[StartService]:
    """Start the service against ``redis_url``; whatever a test started is killed after it."""
    started: list[ServiceProcess] = []

    async def start(redis_url: str, **config: str) -> ServiceProcess:
        process = ServiceProcess(
            {
                "REDIS_URL": redis_url,
                "DATABASE_URL": migrated,
                "REDIS_KEY_PREFIX": key_prefix,
                "POD_NAME": pod,
                "HEALTH_CHECK_INTERVAL": "0.2",
                "HEALTH_CHECK_TIMEOUT": "1000",
                "HEARTBEAT_INTERVAL": "0.1",
                "HEARTBEAT_TTL": "30",
                "TELEMETRY_FLUSH_INTERVAL": "0.1",
                "SHUTDOWN_TIMEOUT": "10",
                **config,
            },
            log_dir=tmp_path / f"service-{len(started)}",
        )
        started.append(process)
        process.start()
        await process.wait_started()
        return process

    yield start
    for process in started:
        process.kill()
        print(process.output())  # shown with a failure


@pytest.fixture
async def proxy() -> AsyncIterator[RedisProxy]:
    proxy = RedisProxy(upstream_port=6379)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_sigterm_under_load_answers_or_refuses_every_batch_and_exits_zero(
    start_service: StartService,
    make_device: DeviceFactory,
    redis: Redis,
    keys: Keys,
    pod: str,
) -> None:
    http_devices = [await make_device() for _ in range(20)]
    ws_devices = [await make_device() for _ in range(3)]
    service = await start_service(REDIS_URL)
    http_replies: list[Reply] = []
    ws_replies: list[Reply] = []

    async with ClientSession(timeout=ClientTimeout(total=15)) as session:
        sockets = [await connect(session, service, device) for device in ws_devices]
        async with asyncio.TaskGroup() as devices:
            for device in http_devices:
                devices.create_task(send_until_refused(session, service.url, device, http_replies))
            for ws, device in zip(sockets, ws_devices, strict=True):
                devices.create_task(stream_until_closed(ws, device, ws_replies))
            async with asyncio.timeout(10):
                while len(http_replies) < 200 or len(ws_replies) < 10:
                    await asyncio.sleep(0.01)
            service.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            async with asyncio.timeout(EXIT_DEADLINE):
                exit_code = await service.exited()
        close_codes = [ws.close_code for ws in sockets]
        for ws in sockets:
            await ws.close()

    assert exit_code == 0
    assert close_codes == [WSCloseCode.GOING_AWAY] * len(ws_devices)
    answered = [r for r in [*http_replies, *ws_replies] if r.status is not None]
    assert [r for r in answered if r.status not in (202, 503)] == []
    assert [r for r in http_replies if r.status is None and r.ended < signalled_at] == []
    acked = {r.batch for r in [*http_replies, *ws_replies] if r.status == 202}
    stored = await stored_batch_counts(redis, keys)
    assert {batch: stored[batch] for batch in acked if stored[batch] != 1} == {}
    final = await heartbeat(redis, keys, pod)
    assert final is not None
    assert (final.draining, final.pending_writes) == (True, 0)
    telemetry = [
        record
        for _, fields in cast(StreamEntries, await redis.xrange(keys.telemetry(pod)))
        for record in decode_batch(fields[b"b"]).records
    ]
    recorded_202s = sum(r[0] == Kind.HTTP and r[1] == PPG_ROUTE and r[3] == 202 for r in telemetry)
    assert recorded_202s == sum(r.status == 202 for r in http_replies)
    assert service.logged_errors() == []


async def test_batches_in_flight_at_sigterm_are_acknowledged_and_stored(
    start_service: StartService,
    proxy: RedisProxy,
    make_device: DeviceFactory,
    redis: Redis,
    keys: Keys,
    pod: str,
) -> None:
    device, ws_device = await make_device(), await make_device()
    service = await start_service(proxy.url, WRITE_TIMEOUT="5")
    batches = 20

    async with ClientSession(timeout=ClientTimeout(total=15)) as session:
        ws = await connect(session, service, ws_device)
        ws_received = asyncio.create_task(received_until_closed(ws))
        proxy.hold()
        await ws.send_str(msgspec.json.encode(ws_device.batch(0)).decode())
        requests = [
            asyncio.create_task(post_batch(session, service.url, device, seq))
            for seq in range(batches)
        ]
        try:
            # Every batch is with the writer; the first write is at Redis, its reply held.
            in_flight = batches + 1
            await wait_for_heartbeat(
                redis, keys, pod, lambda beat: beat.pending_writes == in_flight
            )
            service.send_signal(signal.SIGTERM)
            await wait_for_heartbeat(redis, keys, pod, lambda beat: beat.draining)
            with pytest.raises(ClientConnectorError):  # the listener is closed
                async with session.get(f"{service.url}/health/liveness"):
                    pass
        finally:
            proxy.release()
            replies = await asyncio.gather(*requests)
        async with asyncio.timeout(EXIT_DEADLINE):
            exit_code = await service.exited()
        ws_messages = await ws_received

    assert [(r.seq, r.status) for r in replies] == [(seq, 202) for seq in range(batches)]
    assert ws_messages[-1] == WSCloseCode.GOING_AWAY
    assert exit_code == 0
    stored = await stored_batch_counts(redis, keys)
    expected = [(device.device_id, seq) for seq in range(batches)] + [(ws_device.device_id, 0)]
    assert stored == Counter(expected)
    assert service.logged_errors() == []


async def test_websocket_batch_in_flight_at_sigterm_is_acked_before_the_close(
    start_service: StartService,
    proxy: RedisProxy,
    make_device: DeviceFactory,
    redis: Redis,
    keys: Keys,
    pod: str,
) -> None:
    device = await make_device()
    service = await start_service(proxy.url, WRITE_TIMEOUT="5")

    async with ClientSession(timeout=ClientTimeout(total=15)) as session:
        ws = await connect(session, service, device)
        received = asyncio.create_task(received_until_closed(ws))
        proxy.hold()
        await ws.send_str(msgspec.json.encode(device.batch(7)).decode())
        try:
            await wait_for_heartbeat(redis, keys, pod, lambda beat: beat.pending_writes == 1)
            service.send_signal(signal.SIGTERM)
            await wait_for_heartbeat(redis, keys, pod, lambda beat: beat.draining)
        finally:
            proxy.release()
        async with asyncio.timeout(EXIT_DEADLINE):
            await service.exited()
        messages = await received

    assert messages == [{"ack": 7}, WSCloseCode.GOING_AWAY]


async def test_request_whose_body_is_still_arriving_at_sigterm_gets_an_answer(
    start_service: StartService,
    make_device: DeviceFactory,
    redis: Redis,
    keys: Keys,
    pod: str,
) -> None:
    device = await make_device()
    service = await start_service(REDIS_URL, SHUTDOWN_TIMEOUT="2")
    body = msgspec.json.encode(device.batch(3))
    rest_may_go = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:20]
        await rest_may_go.wait()
        yield body[20:]

    async with ClientSession(timeout=ClientTimeout(total=15)) as session:
        request = asyncio.create_task(
            session.post(f"{service.url}{PPG_ROUTE}", data=slow_body(), headers=device.headers)
        )
        try:
            await wait_for_heartbeat(redis, keys, pod, lambda beat: beat.http_connections == 1)
            await asyncio.sleep(0.3)  # the headers are parsed and the handler reads the body
            service.send_signal(signal.SIGTERM)
            await wait_for_heartbeat(redis, keys, pod, lambda beat: beat.draining)
        finally:
            rest_may_go.set()
        try:
            async with await request as response:
                status: int | None = response.status
        except ClientError:
            status = None
        async with asyncio.timeout(EXIT_DEADLINE):
            await service.exited()
    stored = await stored_batch_counts(redis, keys)

    # Taken (and stored) or refused with a retry hint: either is an answer the device can act on.
    assert (status, stored) in [(202, Counter({(device.device_id, 3): 1})), (503, Counter())]


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request of a device on its keep-alive connection, and what became of it."""

    started: float
    status: int | None
    connection: str  # the answer's Connection header
    error: type[BaseException] | None = None


async def post_until_refused(
    session: ClientSession, url: str, device: Device, exchanges: list[Exchange]
) -> None:
    """Batch after batch, each sent as soon as the previous one is answered, until the
    service refuses the connection or fails to answer."""
    seq = 0
    while True:
        started = time.monotonic()
        try:
            async with session.post(
                f"{url}{PPG_ROUTE}",
                data=msgspec.json.encode(device.batch(seq)),
                headers=device.headers,
            ) as response:
                await response.read()
                exchanges.append(
                    Exchange(started, response.status, response.headers.get("Connection", ""))
                )
        except ClientError as e:
            exchanges.append(Exchange(started, None, "", type(e)))
            return
        seq += 1


async def test_sigterm_under_keep_alive_load_answers_every_request_it_received(
    start_service: StartService, make_device: DeviceFactory
) -> None:
    devices = [await make_device() for _ in range(20)]
    service = await start_service(REDIS_URL)
    exchanges: dict[str, list[Exchange]] = {device.device_id: [] for device in devices}

    async with ClientSession(timeout=ClientTimeout(total=15)) as session:
        async with asyncio.TaskGroup() as load:
            for device in devices:
                load.create_task(
                    post_until_refused(session, service.url, device, exchanges[device.device_id])
                )
            async with asyncio.timeout(10):
                while sum(map(len, exchanges.values())) < 400:
                    await asyncio.sleep(0.01)
            service.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
        async with asyncio.timeout(EXIT_DEADLINE):
            exit_code = await service.exited()

    every = [e for device_exchanges in exchanges.values() for e in device_exchanges]
    assert exit_code == 0
    # Nothing sent on an open connection went unanswered: the only failure is a new
    # connection refused once the service stopped accepting.
    assert {e.error for e in every if e.status is None} == {ClientConnectorError}
    assert [e for e in every if e.started < signalled_at and e.status not in (202, 503)] == []
    # Each device was told, on the last answer it got, that the connection would close.
    last_answers = [[e for e in ex if e.status is not None][-1] for ex in exchanges.values()]
    assert [e.connection.lower() for e in last_answers] == ["close"] * len(devices)
    assert service.logged_errors() == []


async def test_a_device_answering_the_close_frame_late_still_gets_a_clean_1001(
    start_service: StartService, make_device: DeviceFactory
) -> None:
    device = await make_device()
    service = await start_service(REDIS_URL, WS_HANDSHAKE_TIMEOUT="5")
    headers = {"Authorization": device.headers["Authorization"]}

    async with ClientSession(timeout=ClientTimeout(total=15)) as session:
        ws = await session.ws_connect(
            f"{service.url}/ingestion/ws", headers=headers, autoclose=False
        )
        await ws.send_str(msgspec.json.encode(device.batch(1)).decode())
        assert (await ws.receive(timeout=5)).json() == {"ack": 1}
        service.send_signal(signal.SIGTERM)
        close = await ws.receive(timeout=10)
        await asyncio.sleep(0.5)  # a device on a slow link answers the close
        running_at_reply = service.returncode is None
        await ws.close()
        async with asyncio.timeout(EXIT_DEADLINE):
            exit_code = await service.exited()

    assert (close.type, close.data) == (WSMsgType.CLOSE, WSCloseCode.GOING_AWAY)
    assert running_at_reply
    # Had the service closed the connection first, the reply would have failed: 1006.
    assert ws.close_code == WSCloseCode.GOING_AWAY
    assert exit_code == 0
    assert service.logged_errors() == []


def test_the_aiohttp_internals_the_closing_handshake_relies_on_are_there() -> None:
    """service/fastpath/keepalive.py names them; this fails first when an aiohttp upgrade
    moves one."""
    assert "_writer" in web.WebSocketResponse.__annotations__
    assert callable(web.WebSocketResponse._set_closed)
