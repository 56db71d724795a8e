"""Rate limits shared by every replica: GCRA in Redis, on Redis's clock.

Each policy has one or more named windows ("100 per 60 s", "20 per 1 s"); a request passes
only if every window lets it. A window is a GCRA (generic cell rate algorithm) cell: one
number per key, the theoretical arrival time (TAT). A window of ``limit`` per ``seconds``
admits a burst of exactly ``limit`` from rest and then one request every
``seconds / limit``; the decision is exact (no sampling, no approximation between
windows) because it is made atomically in Redis with Redis's own ``TIME``, so neither
replica count nor client clocks change it.

Ingestion is limited per device in the same Lua call as the group-committed write
(``service/store.py`` embeds ``GCRA_LUA``); other routes are limited per client IP with
one ``EVALSHA`` each. When Redis cannot be asked, a per-process GCRA with the same
policies decides (fail open with local limits), or the request is refused with 503 when
``RATE_LIMIT_FAIL_MODE=closed``.

What the routes meet follows the limiters, each one call that answers a whole step: the
per-IP gate (``check_client``), and the ingest policy's verdict in a write's result turned
into the 429 of an HTTP request or of a WebSocket message (``refuse_over_limit``,
``refuse_over_limit_message``). Each counts for the sidecar what is over the limit,
refused or let through in shadow mode.
"""

import asyncio
import hashlib
import ipaddress
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from aiohttp import web
from loguru import logger
from redis.exceptions import NoScriptError

from shared.errors import error_message, error_response, unavailable_response
from shared.keys import Keys
from shared.redisclient import REDIS_ERRORS, RedisClient
from shared.telemetry import rate_limited_record

if TYPE_CHECKING:  # types only: the state holds this module's limiter, the store embeds GCRA_LUA
    from .state import IngestState
    from .store import WriteResult

__all__ = (
    "ALLOWED",
    "GCRA_LUA",
    "REFUSED",
    "SHADOWED",
    "Decision",
    "LocalLimiter",
    "Policy",
    "RateLimitUnavailableError",
    "RateLimiter",
    "TrustedProxies",
    "Window",
    "check_client",
    "decision_from_reply",
    "rate_limit_headers",
    "rate_limit_lines",
    "refuse_over_limit",
    "refuse_over_limit_message",
)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    limit: int
    seconds: float

    @property
    def period_ms(self) -> float:
        return self.seconds * 1000.0

    @property
    def interval_ms(self) -> float:
        return self.seconds * 1000.0 / self.limit


@dataclass(frozen=True, slots=True)
class Policy:
    """A named set of windows, what it is keyed by, and whether it only counts (shadow)."""

    name: str
    windows: tuple[Window, ...]
    key: Literal["ip", "device"] = "ip"
    shadow: bool = False
    # The RateLimit-Policy header value (draft-ietf-httpapi-ratelimit-headers), built once.
    header: str = field(init=False, repr=False, compare=False)
    # What the Lua scripts take after the window count: limit and period (ms) per window.
    args: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    # Per window, the header lines of an answer that do not change from one request to the
    # next (see rate_limit_lines).
    fixed_lines: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError(f"policy {self.name!r} has no window")
        header = ", ".join(f'"{w.name}";q={w.limit};w={_seconds(w.seconds)}' for w in self.windows)
        object.__setattr__(self, "header", header)
        args: list[bytes] = [b"%d" % len(self.windows), b"1" if self.shadow else b"0"]
        for w in self.windows:
            args += [b"%d" % w.limit, repr(w.period_ms).encode()]
        object.__setattr__(self, "args", tuple(args))
        fixed = tuple(
            f"RateLimit-Policy: {header}\r\nX-RateLimit-Limit: {w.limit}\r\n"
            f'RateLimit: "{w.name}";'.encode()
            for w in self.windows
        )
        object.__setattr__(self, "fixed_lines", fixed)


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision: ``allowed`` is False only when refused (never in shadow mode)."""

    allowed: bool
    over: bool
    window: Window
    remaining: int
    # Milliseconds until the window is full again (allowed) or until one more request
    # would pass (refused).
    reset_ms: float

    @property
    def retry_after(self) -> int:
        return _seconds(self.reset_ms / 1000.0)


# The code a GCRA decision returns first: within every window, over one and refused, over
# one but let through because the policy is in shadow mode.
ALLOWED: Final = 1
REFUSED: Final = 2
SHADOWED: Final = 3

# The algorithm once, for both scripts. ``gcra_step`` decides one request of a client
# against ``nw`` windows: ``tats[w]`` is the client's TAT in window ``w`` (ms; nil: none
# yet), ``periods[w]`` the window's period (ms) and ``intervals[w]`` its period / limit;
# ``nexts`` is scratch space. It returns the code (ALLOWED, REFUSED, SHADOWED), the deciding
# window (1-based), remaining, and reset in ms, and when ALLOWED leaves the new TATs in
# ``tats`` (refused or shadowed, they are left as they were). The write script keeps a
# device's TATs in its state record (service/store.py); ``gcra`` keeps a client's in one key per
# window: ``first`` is the index in KEYS of the policy's first window key, and the limits
# and periods come from ARGV starting at ``params`` (``limit, period_ms`` per window).
#
# Each cell holds its TAT (with 17 significant digits, so it reads back exactly: Lua's
# tostring keeps 14, a tenth of a millisecond at today's epoch, enough to refuse a request at
# the boundary) and expires when the TAT is reached.
GCRA_LUA = """
local function gcra_step(tats, nw, periods, intervals, shadow, now, nexts)
  if nw == 1 then
    -- One window (the usual policy), the same arithmetic without the loops.
    local tat, period, interval = tats[1] or now, periods[1], intervals[1]
    if tat < now then tat = now end
    local ahead = tat + interval - now
    if ahead > period then
      if shadow == 0 then return 2, 1, 0, math.ceil(ahead - period) end
      return 3, 1, 0, math.ceil(ahead - period)
    end
    tats[1] = tat + interval
    return 1, 1, math.floor((period - ahead) / interval + 1e-9), math.ceil(ahead)
  end
  local refused, wait = 0, 0
  for w = 1, nw do
    local tat = tats[w] or now
    if tat < now then tat = now end
    local next_tat = tat + intervals[w]
    local over = next_tat - now - periods[w]
    if over > 0 and over > wait then refused, wait = w, over end
    nexts[w] = next_tat
  end
  if refused > 0 then
    if shadow == 0 then return 2, refused, 0, math.ceil(wait) end
    return 3, refused, 0, math.ceil(wait)
  end
  local best, remaining, reset = 1, nil, 0
  for w = 1, nw do
    local ahead = nexts[w] - now
    tats[w] = nexts[w]
    local left = math.floor((periods[w] - ahead) / intervals[w] + 1e-9)
    if remaining == nil or left < remaining then
      best, remaining, reset = w, left, math.ceil(ahead)
    end
  end
  return 1, best, remaining, reset
end

local function gcra(first, nw, shadow, params, now)
  local tats, periods, intervals = {}, {}, {}
  for w = 1, nw do
    periods[w] = tonumber(ARGV[params + 2 * w - 1])
    intervals[w] = periods[w] / tonumber(ARGV[params + 2 * w - 2])
    tats[w] = tonumber(redis.call('GET', KEYS[first + w - 1]))
  end
  local code, best, remaining, reset = gcra_step(tats, nw, periods, intervals, shadow, now, {})
  if code == 1 then
    for w = 1, nw do
      local tat = tats[w]
      redis.call('SET', KEYS[first + w - 1], string.format('%.17g', tat),
        'PX', math.ceil(tat - now))
    end
  end
  return code, best, remaining, reset
end

local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

_CHECK_LUA = (
    "#!lua\n"
    + GCRA_LUA
    + """
local code, w, remaining, reset = gcra(1, tonumber(ARGV[1]), tonumber(ARGV[2]), 3, redis_now_ms())
return {code, w, remaining, reset}
"""
)
# Redis names scripts by their SHA-1; nothing here relies on it as a secure hash.
_CHECK_SHA = hashlib.sha1(_CHECK_LUA.encode()).hexdigest()  # noqa: S324


def decision_from_reply(
    policy: Policy, code: int, window: int, remaining: int, reset_ms: int
) -> Decision:
    return Decision(
        allowed=code != REFUSED,
        over=code != ALLOWED,
        window=policy.windows[window - 1],
        remaining=remaining,
        reset_ms=float(reset_ms),
    )


def rate_limit_headers(policy: Policy, decision: Decision) -> dict[str, str]:
    """The IETF draft's ``RateLimit-Policy``/``RateLimit`` and the classic ``X-RateLimit-*``."""
    window = decision.window
    reset = decision.retry_after
    headers = {
        "RateLimit-Policy": policy.header,
        "RateLimit": f'"{window.name}";r={decision.remaining};t={reset}',
        "X-RateLimit-Limit": str(window.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(reset),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(reset)
    return headers


def rate_limit_lines(policy: Policy, window: int, remaining: int, reset_ms: int) -> bytes:
    """The headers of ``rate_limit_headers`` for an allowed request, as CRLF-terminated
    header lines for ``AckResponse``, from the write script's reply (``window`` 1-based)."""
    reset = max(1, -(-reset_ms // 1000))
    return b"%sr=%d;t=%d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n" % (
        policy.fixed_lines[window - 1],
        remaining,
        reset,
        remaining,
        reset,
    )


class RateLimitUnavailableError(Exception):
    """Redis cannot decide and the fail mode is ``closed``."""


class LocalLimiter:
    """The same GCRA in this process, on its monotonic clock: the fallback while Redis is away.

    Each replica then applies the full limits on its own (fail open with local limits).
    Keys are kept up to ``max_keys``; the oldest are forgotten first.
    """

    def __init__(self, *, max_keys: int = 100_000) -> None:
        self._tats: dict[tuple[str, str, str], float] = {}
        self._max_keys = max_keys

    def check(self, policy: Policy, key: str) -> Decision:
        now = time.monotonic() * 1000.0
        refused: Window | None = None
        wait = 0.0
        new_tats: list[float] = []
        for w in policy.windows:
            tat = max(self._tats.get((policy.name, w.name, key), now), now)
            new_tat = tat + w.interval_ms
            over = new_tat - now - w.period_ms
            if over > 0 and over > wait:
                refused, wait = w, over
            new_tats.append(new_tat)
        if refused is not None:
            return Decision(policy.shadow, True, refused, 0, wait)
        best: Decision | None = None
        for w, new_tat in zip(policy.windows, new_tats, strict=True):
            ahead = new_tat - now
            self._remember((policy.name, w.name, key), new_tat)
            left = math.floor((w.period_ms - ahead) / w.interval_ms + 1e-9)
            if best is None or left < best.remaining:
                best = Decision(True, False, w, left, ahead)
        assert best is not None
        return best

    def _remember(self, cell: tuple[str, str, str], tat: float) -> None:
        self._tats.pop(cell, None)
        self._tats[cell] = tat
        if len(self._tats) > self._max_keys:
            del self._tats[next(iter(self._tats))]


class RateLimiter:
    """Decides for routes outside the write path: one ``EVALSHA`` per request."""

    def __init__(
        self, redis: RedisClient, keys: Keys, *, fail_closed: bool, timeout: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._fail_closed = fail_closed
        self._timeout = timeout
        self._local = LocalLimiter()
        self._outage = False
        self.fallback_decisions = 0

    @property
    def degraded(self) -> bool:
        """True while Redis cannot decide (local limits or refusals apply)."""
        return self._outage

    async def check(self, policy: Policy, key: str) -> Decision:
        cells = [self._keys.rate_limit(policy.name, w.name, key) for w in policy.windows]
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._evalsha(cells, policy.args)
        except REDIS_ERRORS as e:
            if not self._outage:
                self._outage = True
                mode = "refusing requests" if self._fail_closed else "limiting per process"
                logger.warning("rate limiter: Redis unavailable ({}), {}", type(e).__name__, mode)
            self.fallback_decisions += 1
            if self._fail_closed:
                raise RateLimitUnavailableError("rate limits cannot be checked now") from e
            return self._local.check(policy, key)
        if self._outage:
            self._outage = False
            logger.info("rate limiter: Redis is back; shared limits apply again")
        code, window, remaining, reset = (int(v) for v in reply)
        return decision_from_reply(policy, code, window, remaining, reset)

    async def _evalsha(self, cells: Sequence[str], args: Sequence[bytes]) -> list[int]:
        try:
            reply: list[int] = await self._redis.evalsha(_CHECK_SHA, len(cells), *cells, *args)
        except NoScriptError:
            await self._redis.script_load(_CHECK_LUA)
            reply = await self._redis.evalsha(_CHECK_SHA, len(cells), *cells, *args)
        return reply


class TrustedProxies:
    """Who the client is: the peer, or what the trusted proxies in front of us say it is.

    Only the one header the proxies are configured to write (``X-Forwarded-For`` or
    ``Forwarded``, ``TRUSTED_PROXY_HEADER``) is read; the other is the client's own and
    ignored. Each proxy appends the address it received the request from, so the header is
    walked from the right past the proxies we trust: the first other address is the client.
    Everything left of it was written by the client and proves nothing. When no address is
    left, or the nearest one is not an IP address (``unknown``, an obfuscated name), the peer
    is the client's identity.
    """

    def __init__(self, networks: Sequence[IpNetwork], *, header: str = "x-forwarded-for") -> None:
        if header not in ("x-forwarded-for", "forwarded"):
            raise ValueError(f"unknown proxy header {header!r}")
        self._networks = tuple(networks)
        self._forwarded = header == "forwarded"

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def client_ip(self, request: web.BaseRequest) -> str:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        address = peer[0] if isinstance(peer, tuple) and peer else "unknown"
        if not self._networks or not self.trusts(address):
            return address
        for hop in reversed(self._hops(request)):
            if not self.trusts(hop):
                return hop or address
        return address

    def _hops(self, request: web.BaseRequest) -> list[str]:
        """The addresses in the configured header, nearest last; ``""`` for one that is not
        an address. Repeated header lines count as one list, in their order."""
        if not self._forwarded:
            return [
                _bare_address(hop)
                for line in request.headers.getall("X-Forwarded-For", ())
                for hop in line.split(",")
            ]
        hops: list[str] = []
        for line in request.headers.getall("Forwarded", ()):
            for element in line.split(","):
                for pair in element.split(";"):
                    name, _, value = pair.strip().partition("=")
                    if name.lower() == "for":
                        hops.append(_bare_address(value))
        return hops


def _bare_address(value: str) -> str:
    """``"[2001:db8::1]:4711"`` or ``192.0.2.1:80`` → the address alone; junk → ``""``."""
    value = value.strip().strip('"')
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return ""


# What the routes meet. Each is one call from a route's step and answers it whole: the
# decision, its telemetry, and the answer (429 and its headers, or the headers to add).


async def check_client(
    state: "IngestState",
    request: web.BaseRequest,
    route: str,
    policy: Policy,
    *,
    refusal: str = "rate limit exceeded",
) -> web.Response | dict[str, str]:
    """The per-IP gate of ``policy``: the refusal to answer (429 with ``refusal``; 503 when
    Redis cannot decide and limits fail closed), else the headers the answer carries."""
    try:
        decision = await state.limiter.check(policy, state.proxies.client_ip(request))
    except RateLimitUnavailableError as e:
        return unavailable_response(str(e), state.retry_after)
    if decision.over:
        status = 200 if decision.allowed else 429
        state.telemetry.record(rate_limited_record(route, policy.name, status))
    headers = rate_limit_headers(policy, decision)
    if not decision.allowed:
        details = {"policy": policy.name, "window": decision.window.name}
        return error_response(429, refusal, details, headers=headers)
    return headers


def _over_ingest_limit(state: "IngestState", route: str, result: "WriteResult") -> Decision:
    """The decision in a write's reply that is over the ingest policy, counted."""
    policy = state.ingest_policy
    assert policy is not None  # a verdict comes only from a policy
    decision = decision_from_reply(
        policy, result.verdict, result.window, result.remaining, result.reset_ms
    )
    status = 200 if decision.allowed else 429
    state.telemetry.record(rate_limited_record(route, policy.name, status))
    return decision


def refuse_over_limit(
    state: "IngestState", route: str, result: "WriteResult"
) -> web.Response | None:
    """For a write over the ingest policy (``REFUSED`` or ``SHADOWED``): the 429 to answer,
    or None when shadow mode let it through."""
    decision = _over_ingest_limit(state, route, result)
    if decision.allowed:
        return None
    policy = state.ingest_policy
    assert policy is not None
    details = {"policy": policy.name, "window": decision.window.name}
    headers = rate_limit_headers(policy, decision)
    return error_response(429, "rate limit exceeded", details, headers=headers)


def refuse_over_limit_message(
    state: "IngestState", route: str, result: "WriteResult", seq: int
) -> str | None:
    """``refuse_over_limit`` for a WebSocket message: the 429 message to answer, or None."""
    decision = _over_ingest_limit(state, route, result)
    if decision.allowed:
        return None
    policy = state.ingest_policy
    assert policy is not None
    details = {"policy": policy.name, "window": decision.window.name}
    return error_message(429, "rate limit exceeded", seq, details, retry_after=decision.retry_after)
