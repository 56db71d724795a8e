"""What the ingestion handlers need, gathered in one object so a request looks it up once."""

from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from shared.reporting import LoopLagMonitor, Telemetry
from shared.tracing import Tracing

from .fastpath.keepalive import Peer
from .partitions import PartitionedBacklog, PartitionedWriter
from .ratelimit import Policy, RateLimiter, TrustedProxies
from .tokens import TokenCache

__all__ = ("IngestState",)


@dataclass(slots=True, eq=False)
class IngestState:
    tokens: TokenCache
    writer: PartitionedWriter
    backlog: PartitionedBacklog
    telemetry: Telemetry
    loop_lag: LoopLagMonitor
    max_body_bytes: int
    retry_after: int
    ws_heartbeat: float
    limiter: RateLimiter
    proxies: TrustedProxies
    # None when rate limiting is off. The ingest policy is decided inside the write.
    api_policy: Policy | None
    ingest_policy: Policy | None
    # Refused WebSocket messages in a row before the socket is closed with 1008.
    ws_close_after: int
    tracing: Tracing
    # Open device sockets, with what the keep-alive sweeper knows of each.
    websockets: dict[web.WebSocketResponse, Peer] = field(default_factory=dict)
    draining: bool = False
    # Batches taken before draining began and not yet answered (HTTP requests, WS messages).
    batches_in_flight: int = 0
    # Set by whoever runs the server (it knows the connections); unknown until then.
    count_connections: Callable[[], int] = lambda: -1
