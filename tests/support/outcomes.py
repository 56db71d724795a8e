"""What became of a batch a test device sent: the fault and failover tests keep every one."""

import time
from dataclasses import dataclass

import msgspec
from aiohttp import ClientError, ClientSession

from tests.support.env import Device

__all__ = ("Outcome", "send_http")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one batch: 202 acknowledged, 503 refused, 0 no answer (the connection
    dropped or timed out), anything else a failure."""

    device_id: str
    seq: int
    transport: str
    started: float
    ended: float
    status: int
    retry_after: str | None = None
    detail: str = ""

    @property
    def batch(self) -> tuple[str, int]:
        return self.device_id, self.seq


async def send_http(session: ClientSession, url: str, device: Device, seq: int) -> Outcome:
    """``POST /ingestion/ppg`` of the device's batch ``seq``, and what became of it."""
    started = time.monotonic()
    try:
        async with session.post(
            f"{url}/ingestion/ppg",
            data=msgspec.json.encode(device.batch(seq)),
            headers=device.headers,
        ) as response:
            detail = await response.text()
            status, retry_after = response.status, response.headers.get("Retry-After")
    except (ClientError, TimeoutError) as e:
        status, retry_after, detail = 0, None, repr(e)
    return Outcome(
        device.device_id, seq, "http", started, time.monotonic(), status, retry_after, detail
    )
