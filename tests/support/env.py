"""What tests share besides fixtures: the machine's servers, a registered device, types."""

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

__all__ = ("POSTGRES_URL", "REDIS_URL", "AiohttpClient", "Device", "DeviceFactory")

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@dataclasses.dataclass(frozen=True)
class Device:
    device_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def batch(self, seq: int, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "device_id": self.device_id,
            "seq": seq,
            "ts": 1_764_000_000_000 + seq * 1000,
            "rate_hz": 50,
            "ppg": [0.5, 0.6, 0.7, 0.65],
            "hr": 72,
            "spo2": 98,
        }
        body.update(overrides)
        return body


DeviceFactory = Callable[[], Awaitable[Device]]
