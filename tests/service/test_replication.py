"""What an ack means when the Redis primary is lost: a real primary and replica, ``kill -9``.

The service runs as a real process; the address it is given forwards to the current
primary, and the replica's link to the primary goes through a forwarder too
(``tests/support/replication.py``). Devices keep sending over HTTP, each batch a new seq.
The link is cut for a while (both ends still see it up; the replica just falls behind), then
the primary is killed with what the link held back, the replica promoted and the address
moved to it: what a failover does when the primary dies with writes its replica never got.

- ``ACK_MODE=replicated``: a write the replica does not confirm within ``ACK_TIMEOUT`` is
  answered 503, so every acknowledged batch is in the promoted replica's stream. The
  promoted primary has no replica, so the service refuses until one attaches, then
  acknowledges again by itself.
- ``ACK_MODE=primary``: the writes made while the link was cut were acknowledged and are
  lost with the primary. The test shows exactly that: every batch acknowledged after the
  cut is lost, and nothing acknowledged well before it.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import msgspec
import pytest
from aiohttp import ClientError, ClientSession

from service.fastpath.resp import RespConnection
from service.store import STORED, WRITE_CONNECTION_SETUP, ReadingsWriter
from shared.keys import Keys
from shared.readings import decode_entries
from shared.tasks import cancel_and_wait
from tests.support.env import Device, DeviceFactory
from tests.support.load import device_load
from tests.support.outcomes import Outcome
from tests.support.procs import ServiceProcess
from tests.support.replication import Forwarder, RedisNode

KEY_PREFIX = "replication:"
SENDERS = 12
PACE = 0.01  # seconds between one device's batches
ACK_TIMEOUT = 0.3
OPERATOR_TOKEN = "replication-operator"  # noqa: S105 - the test's own token
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


async def acks_after(outcomes: list[Outcome], since: float, count: int, *, within: float) -> None:
    async with asyncio.timeout(within):
        while sum(1 for o in outcomes if o.status == 202 and o.started >= since) < count:
            await asyncio.sleep(0.05)


async def stored_batches(node: RedisNode) -> set[tuple[str, int]]:
    client = node.client()
    try:
        entries = cast(StreamEntries, await client.xrange(Keys(KEY_PREFIX).readings))
    finally:
        await client.aclose()
    stored = set()
    for _, fields in entries:
        for entry in decode_entries(fields):
            batch = msgspec.json.decode(entry.batch)
            stored.add((batch["device_id"], batch["seq"]))
    return stored


async def replication_check(session: ClientSession, readiness: str) -> dict[str, object]:
    """What readiness says of replication, as the operator sees it (``{}``: no answer)."""
    try:
        async with session.get(readiness, headers=OPERATOR) as response:
            body = await response.json()
    except (ClientError, TimeoutError, ValueError):
        return {}
    check: dict[str, object] = body.get("details", {}).get("redis-replication", {})
    return check


def unexplained(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """Answers that are neither an ack, nor a 503 telling the device when to retry, nor no
    answer at all (the connection dropped with the primary)."""
    return [
        o
        for o in outcomes
        if not (o.status in (202, 0) or (o.status == 503 and o.retry_after == "1"))
    ]


@dataclass
class Cluster:
    primary: RedisNode
    replica: RedisNode
    link: Forwarder  # the replica's link to the primary
    address: Forwarder  # what the service is given: the current primary


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    primary = RedisNode(tmp_path / "primary")
    link = Forwarder(primary)
    replica = RedisNode(tmp_path / "replica", replica_of=link)
    address = Forwarder(primary)
    nodes = [primary, replica]
    try:
        await link.start()
        await address.start()
        for node in nodes:
            node.start()
            await node.wait_ready()
        await replica.wait_in_sync()
        yield Cluster(primary, replica, link, address)
    finally:
        await address.close()
        await link.close()
        for node in nodes:
            node.kill()


@pytest.fixture
async def devices(make_device: DeviceFactory) -> list[Device]:
    return [await make_device() for _ in range(SENDERS)]


async def start_service(
    cluster: Cluster, migrated: str, tmp_path: Path, ack_mode: str
) -> ServiceProcess:
    service = ServiceProcess(
        {
            "REDIS_URL": cluster.address.url,
            "DATABASE_URL": migrated,
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "POD_NAME": f"replication-{ack_mode}",
            "ACK_MODE": ack_mode,
            "ACK_REPLICAS": "1",
            "ACK_TIMEOUT": str(ACK_TIMEOUT),
            "WRITE_TIMEOUT": "1",
            "HEALTH_CHECK_INTERVAL": "0.2",
            "HEALTH_CHECK_TIMEOUT": "500",
            "RETRY_AFTER": "1",
            "TOKEN_REFRESH_INTERVAL": "0.5",
            "SHUTDOWN_TIMEOUT": "2",
            "HEALTH_DETAIL_TOKEN": OPERATOR_TOKEN,
        },
        log_dir=tmp_path / f"service-{ack_mode}",
    )
    service.start()
    await service.wait_started()
    return service


async def lose_the_primary(cluster: Cluster) -> None:
    """The primary dies with the writes its cut link held back; the replica takes over."""
    cluster.primary.kill()
    cluster.link.drop()
    await cluster.replica.promote()
    cluster.address.point_at(cluster.replica)


async def test_replicated_acks_survive_losing_the_primary(
    cluster: Cluster, migrated: str, devices: list[Device], tmp_path: Path
) -> None:
    service = await start_service(cluster, migrated, tmp_path, "replicated")
    readiness = f"{service.url}/health/readiness"
    try:
        async with device_load(service.url, devices, pace=PACE) as outcomes:
            await acks_after(outcomes, 0, 100, within=20)
            cluster.link.cut()
            cut_at = time.monotonic()
            await asyncio.sleep(1.0)
            await lose_the_primary(cluster)
            promoted_at = time.monotonic()
            # No replica behind the new primary: nothing can be acknowledged, so nothing
            # is, and readiness says why.
            async with ClientSession() as session:
                async with asyncio.timeout(10):
                    while (await replication_check(session, readiness)).get("message") != (
                        "acks wait for 1 replicas, 0 online"
                    ):
                        await asyncio.sleep(0.05)
            unready_at = time.monotonic()
            await asyncio.sleep(1.0)
            without_replica_until = time.monotonic()
            # A new replica attaches: the service acknowledges again by itself.
            spare = RedisNode(tmp_path / "spare", replica_of=cluster.replica)
            spare.start()
            try:
                await spare.wait_ready()
                await spare.wait_in_sync()
                await acks_after(outcomes, time.monotonic(), 100, within=20)
            finally:
                spare.kill()
        stored = await stored_batches(cluster.replica)
        alive = service.returncode is None
        errors = service.logged_errors()
    finally:
        service.kill()
        print(service.output())

    acked = {o.batch for o in outcomes if o.status == 202}
    cut = [o for o in outcomes if cut_at + ACK_TIMEOUT + 0.2 <= o.started <= promoted_at]
    unreplicated = [
        o for o in outcomes if unready_at <= o.started and o.ended <= without_replica_until
    ]
    assert unexplained(outcomes) == []
    assert acked - stored == set(), "acknowledged batches lost with the primary"
    assert cut
    assert {o.status for o in cut} <= {503, 0}
    assert unreplicated
    assert {o.status for o in unreplicated} == {503}
    # Refused at once, not after waiting out ACK_TIMEOUT for replicas that are not there.
    assert max(o.ended - o.started for o in unreplicated) < ACK_TIMEOUT
    assert alive
    assert errors == []


async def test_primary_acks_lose_what_the_replica_had_not_got(
    cluster: Cluster, migrated: str, devices: list[Device], tmp_path: Path
) -> None:
    service = await start_service(cluster, migrated, tmp_path, "primary")
    try:
        async with device_load(service.url, devices, pace=PACE) as outcomes:
            await acks_after(outcomes, 0, 100, within=20)
            cluster.link.cut()
            cut_at = time.monotonic()
            await acks_after(outcomes, cut_at, 50, within=10)
            killed_at = time.monotonic()
            await lose_the_primary(cluster)
            await acks_after(outcomes, time.monotonic(), 100, within=20)
        stored = await stored_batches(cluster.replica)
        alive = service.returncode is None
        errors = service.logged_errors()
    finally:
        service.kill()
        print(service.output())

    acked = {o.batch for o in outcomes if o.status == 202}
    lost = acked - stored
    assert unexplained(outcomes) == []
    # What primary acks promise: a batch acknowledged after the link was cut is lost with
    # the primary (the replica never got it); one acknowledged well before is not.
    assert lost, "nothing was lost: the test did not exercise the failover it claims"
    after_cut = [o for o in outcomes if cut_at + 0.1 <= o.started and o.ended <= killed_at]
    assert {o.batch for o in after_cut if o.status == 202} <= lost
    assert lost <= {o.batch for o in outcomes if o.status == 202 and o.ended >= cut_at - 0.5}
    assert alive
    assert errors == []


async def test_writes_in_flight_share_their_waits_and_every_ack_is_on_the_replica(
    cluster: Cluster,
) -> None:
    """Replicated acks through the writer itself: writes in flight share WAITs (one WAIT
    answers for every write sent before it on the connection), and what is acknowledged is
    on the replica."""
    keys = Keys("shared-waits:")
    conn = RespConnection(cluster.primary.url, connect_timeout=2, setup=WRITE_CONNECTION_SETUP)
    writer = ReadingsWriter(
        conn,
        keys,
        max_batch=4,
        max_pending=10_000,
        max_in_flight=8,
        timeout=5,
        idempotency_window=128,
        idempotency_ttl=60,
        ack_replicas=1,
        ack_timeout=2,
    )
    runner = asyncio.create_task(writer.run())
    try:
        results = await asyncio.gather(
            *(
                writer.submit(f"dev-{device}", seq, b'{"seq":%d}' % seq)
                for seq in range(20)
                for device in range(20)
            )
        )
    finally:
        await cancel_and_wait([runner])
        conn.close()

    assert {r.stored for r in results} == {STORED}
    assert writer.unreplicated == 0
    assert 0 < writer.waits < writer.batches
    replica = cluster.replica.client()
    try:
        entries = cast(StreamEntries, await replica.xrange(keys.readings))
    finally:
        await replica.aclose()
    assert sum(len(decode_entries(fields)) for _, fields in entries) == 400
