"""JSON lines to Logstash over TCP, shipped by a thread so that logging never waits on it.

The logging side only appends the encoded line to a bounded deque (no lock, no syscall, no
wake-up). A daemon thread drains it: it connects, sends what is queued in batches, polls the
socket while idle so it notices Logstash hanging up, and reconnects with exponential backoff
and jitter. While Logstash is away lines are kept up to ``buffer_lines``; the newest beyond
that are dropped and counted, and the outage is logged once when it starts and once when it
ends (with the number of lines lost).

A thread rather than an asyncio task: loguru sinks are synchronous and run in whatever
thread logs, the same process logs before its event loop starts and after it has stopped,
and a blocking connect or send (DNS, a stalled Logstash) then never touches the event loop.
The thread takes the GIL only to join a batch of lines and to poll.

Delivery is at most once: a batch whose send fails is counted as dropped, and lines written
just before Logstash's end of the connection is noticed can be lost without being counted.
"""

import random
import select
import socket
import threading
from collections import deque

from loguru import logger

__all__ = ("LogstashShipper",)

_BATCH_BYTES = 256 * 1024
_FIRST_BACKOFF = 0.1


class LogstashShipper:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        buffer_lines: int,
        reconnect_max: float,
        connect_timeout: float = 2.0,
        send_timeout: float = 5.0,
        idle_poll: float = 0.05,
    ) -> None:
        self.address = (host, port)
        self._limit = buffer_lines
        self._reconnect_max = reconnect_max
        self._connect_timeout = connect_timeout
        self._send_timeout = send_timeout
        self._idle_poll_ms = max(1, int(idle_poll * 1000))
        self._buffer: deque[bytes] = deque()
        # Two counters, each written by one side only, so neither needs a lock.
        self._dropped_full = 0
        self._dropped_unsent = 0
        self._connected = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="logstash-shipper", daemon=True)

    @property
    def dropped(self) -> int:
        """Lines that never reached Logstash: buffer full, failed sends, unsent at close."""
        return self._dropped_full + self._dropped_unsent

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def connected(self) -> bool:
        return self._connected

    def put(self, line: bytes) -> None:
        """Queue one encoded line (newline included); never blocks."""
        if len(self._buffer) < self._limit:
            self._buffer.append(line)
        else:
            self._dropped_full += 1

    def start(self) -> None:
        self._thread.start()

    def close(self, *, timeout: float = 2.0) -> None:
        """Send what is queued if Logstash is there (within ``timeout``), then stop."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        sock: socket.socket | None = None
        poller = select.poll()
        attempt = 0
        outage: int | None = None  # ``dropped`` when the current outage began
        try:
            while True:
                stopping = self._stopping.is_set()
                if sock is None:
                    try:
                        sock = self._connect()
                    except OSError as e:
                        outage = self._outage(outage, e)
                        if stopping:
                            return
                        self._stopping.wait(self._backoff(attempt))
                        attempt += 1
                        continue
                    poller = select.poll()
                    poller.register(sock, select.POLLIN)
                    attempt = 0
                    self._connected = True
                if outage is not None and len(self._buffer) < self._limit:
                    # Said once there is room for the line, so that Logstash gets it too.
                    logger.info(
                        "logstash {}:{} reachable again; {} lines dropped while away",
                        *self.address,
                        self.dropped - outage,
                    )
                    outage = None
                if not self._buffer:
                    if stopping:
                        return
                    # Idle: wait for lines, noticing meanwhile whether Logstash hung up.
                    if self._hung_up(sock, poller, self._idle_poll_ms):
                        sock.close()
                        sock, outage = None, self._outage(outage, "connection closed")
                    continue
                if self._hung_up(sock, poller, 0):
                    sock.close()
                    sock, outage = None, self._outage(outage, "connection closed")
                    continue
                batch = self._take_batch()
                try:
                    sock.sendall(b"".join(batch))
                except OSError as e:
                    self._dropped_unsent += len(batch)
                    sock.close()
                    sock, outage = None, self._outage(outage, str(e) or type(e).__name__)
        finally:
            self._connected = False
            if sock is not None:
                sock.close()
            self._dropped_unsent += len(self._buffer)
            self._buffer.clear()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self._connect_timeout)
        sock.settimeout(self._send_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._reconnect_max, _FIRST_BACKOFF * 2.0 ** min(attempt, 30))
        return ceiling * random.uniform(0.5, 1.0)

    def _take_batch(self) -> list[bytes]:
        buffer = self._buffer
        batch: list[bytes] = []
        size = 0
        # Only this thread takes from the deque, so a non-empty deque stays non-empty.
        while buffer and size < _BATCH_BYTES:
            line = buffer.popleft()
            batch.append(line)
            size += len(line)
        return batch

    @staticmethod
    def _hung_up(sock: socket.socket, poller: "select.poll", timeout_ms: int) -> bool:
        if not poller.poll(timeout_ms):
            return False
        try:
            # Logstash sends nothing on this connection: readable means closed (or garbage).
            return sock.recv(65536) == b""
        except OSError:
            return True

    def _outage(self, outage: int | None, reason: object) -> int:
        """Mark Logstash away; warn only when an outage begins. ``dropped`` at its start."""
        if outage is None:
            outage = self.dropped
            # Logged before ``connected`` turns false: whoever sees it false finds the
            # warning already queued (the tests count on that).
            logger.warning(
                "logstash {}:{} unreachable ({}); keeping up to {} lines, dropping beyond",
                *self.address,
                reason,
                self._limit,
            )
        self._connected = False
        return outage
