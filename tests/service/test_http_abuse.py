"""What no HTTP client library sends: requests written byte by byte to ``pulsecal-service``.

Each test sends something broken over a raw socket and expects either a JSON refusal
(``{"error": {"code", "message", "details"}}`` with a 4xx) or, where no answer is possible
(the client stopped halfway), the connection closed cleanly. Never a 5xx, never an error in
the service's log (a client's fault is at most a warning), and afterwards the service still
stores a well-formed batch. One service process serves the whole module, as it would serve
every client: what one test does to it, the next one sees.
"""

import asyncio
import contextlib
import gzip
import json
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, cast

import psycopg
import pytest
import redis

from shared.devices import add_device
from shared.keys import Keys
from shared.wire import decode_batch
from tests.support.env import REDIS_URL, Device
from tests.support.procs import ServiceProcess
from tests.support.readings import batches_of

MAX_BODY_BYTES = 64 * 1024
DEADLINE = 10.0  # seconds for an answer or a close: a hang guard, not a speed requirement
INGEST = b"/ingestion/ppg"
ADMIN_TOKEN = "op-" + uuid.uuid4().hex
# redis-py types stream entries as Optional throughout; without decode_responses they are:
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]
OPERATOR = b"Authorization: Bearer " + ADMIN_TOKEN.encode()


@dataclass(frozen=True)
class Answer:
    status: int
    version: bytes
    headers: dict[str, str]  # names lowercased
    body: bytes

    def error(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        document = json.loads(self.body)
        assert isinstance(document, dict), self
        assert set(document) == {"error"}, self
        assert set(document["error"]) == {"code", "message", "details"}, self
        return document["error"]  # type: ignore[no-any-return]


class Connection:
    """One TCP connection to the service: bytes out, HTTP/1.x answers in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer | None:
        """The next answer, or None when the service closed the connection before one."""
        async with asyncio.timeout(DEADLINE):
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise AssertionError(f"connection closed mid-answer: {e.partial!r}") from e
                return None
            except ConnectionResetError:
                return None
            status_line, *lines = head[:-4].split(b"\r\n")
            version, status, *_ = status_line.split(b" ", 2)
            headers = {}
            for line in lines:
                name, _, value = line.partition(b":")
                headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self._chunked()
            else:
                body = await self.reader.read()
            return Answer(int(status), version, headers, body)

    async def _chunked(self) -> bytes:
        body = b""
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        await self.reader.readuntil(b"\r\n")
        return body

    async def closed(self) -> bool:
        """Whether the service closed the connection (nothing more comes)."""
        async with asyncio.timeout(DEADLINE):
            try:
                return await self.reader.read(1) == b""
            except ConnectionResetError:
                return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):  # the service closed first
            await self.writer.wait_closed()


@dataclass(frozen=True)
class Service:
    process: ServiceProcess
    device: Device
    key_prefix: str

    @property
    def port(self) -> int:
        return self.process.port

    def batch(self, seq: int, **overrides: Any) -> bytes:
        return json.dumps(Device.batch(self.device, seq, **overrides)).encode()

    def post(
        self, body: bytes, *headers: bytes, version: bytes = b"HTTP/1.1", close: bool = True
    ) -> bytes:
        """A POST of ``body`` to the ingest route with the device's token."""
        lines = [
            b"POST " + INGEST + b" " + version,
            b"Host: localhost",
            b"Authorization: Bearer " + self.device.token.encode(),
            b"Content-Type: application/json",
            *headers,
        ]
        if close:
            lines.append(b"Connection: close")
        if not any(
            h.lower().startswith((b"content-length:", b"transfer-encoding:")) for h in headers
        ):
            lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join([*lines, b"", b""]) + body


@pytest.fixture(scope="module")
def service(migrated: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    device_id = f"abuse-{uuid.uuid4().hex[:12]}"

    async def register() -> str:
        async with await psycopg.AsyncConnection.connect(migrated) as conn:
            return await add_device(conn, device_id)

    token = asyncio.run(register())
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    process = ServiceProcess(
        {
            "REDIS_URL": REDIS_URL,
            "DATABASE_URL": migrated,
            "REDIS_KEY_PREFIX": prefix,
            "POD_NAME": f"abuse-{uuid.uuid4().hex[:8]}",
            "MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "ADMIN_TOKEN": ADMIN_TOKEN,
            # Hundreds of requests from one address: the API budget would answer 429 first.
            "RATE_LIMIT_ENABLED": "false",
        },
        log_dir=tmp_path_factory.mktemp("abuse-service"),
    )
    try:
        process.start()
        asyncio.run(process.wait_started())
        yield Service(process, Device(device_id, token), prefix)
    finally:
        process.kill()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
async def connect(service: Service) -> AsyncIterator[Any]:
    """Opens connections to the service; afterwards, checks it logged no error and still
    stores a well-formed batch."""
    errors_before = len(service.process.logged_errors())
    opened: list[Connection] = []

    async def open_connection() -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        connection = Connection(reader, writer)
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        await connection.close()
    await assert_still_serving(service)
    assert service.process.logged_errors()[errors_before:] == []


_next_seq = iter(range(10**6, 10**7))


async def assert_still_serving(service: Service) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    connection = Connection(reader, writer)
    try:
        seq = next(_next_seq)
        await connection.send(service.post(service.batch(seq)))
        answer = await connection.answer()
    finally:
        await connection.close()
    assert answer is not None
    assert answer.status == 202, answer
    assert json.loads(answer.body) == {"accepted": 4, "seq": seq, "duplicate": False}


async def exchange(connect: Any, data: bytes, *, half_close: bool = False) -> Answer | None:
    """``data`` on a new connection (its writing side closed after, if ``half_close``); the
    first answer, or None if the connection was closed without one."""
    connection: Connection = await connect()
    await connection.send(data)
    if half_close:
        connection.writer.write_eof()
    return await connection.answer()


def assert_refused(answer: Answer | None, *statuses: int) -> dict[str, Any]:
    assert answer is not None, "closed without an answer"
    assert answer.status in statuses, answer
    return answer.error()


def head(method: bytes, path: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    lines = [method + b" " + path + b" " + version, b"Host: localhost", *headers]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


# --- headers -----------------------------------------------------------------------------


async def test_authorization_that_is_not_utf8_is_401_json(service: Service, connect: Any) -> None:
    request = service.post(service.batch(1)).replace(
        b"Bearer " + service.device.token.encode(), b"Bearer \xff\xfe\xfd" + b"\x80" * 20
    )

    error = assert_refused(await exchange(connect, request), 401)

    assert error["code"] == "unauthorized"


async def test_content_type_that_is_not_utf8_is_415_json(service: Service, connect: Any) -> None:
    request = service.post(service.batch(2), b"X-Ignored: \xc3\x28").replace(
        b"Content-Type: application/json", b"Content-Type: application/\xffjson"
    )

    assert_refused(await exchange(connect, request), 415)


async def test_header_value_with_nul_byte_is_400_json(service: Service, connect: Any) -> None:
    request = head(b"GET", b"/health/liveness", b"X-Probe: a\x00b")

    assert_refused(await exchange(connect, request), 400)


async def test_huge_header_is_refused_as_json(service: Service, connect: Any) -> None:
    request = service.post(service.batch(3), b"X-Padding: " + b"a" * 100_000)

    assert_refused(await exchange(connect, request), 400, 431)


async def test_thousands_of_headers_are_refused_as_json(service: Service, connect: Any) -> None:
    many = [b"X-H%d: v" % i for i in range(5_000)]
    request = service.post(service.batch(4), *many)

    assert_refused(await exchange(connect, request), 400, 431)


async def test_header_line_without_colon_is_400_json(service: Service, connect: Any) -> None:
    request = head(b"GET", b"/health/liveness", b"this is not a header")

    assert_refused(await exchange(connect, request), 400)


async def test_huge_request_target_is_refused_as_json(service: Service, connect: Any) -> None:
    request = head(b"GET", b"/alerts?device_id=" + b"a" * 100_000)

    assert_refused(await exchange(connect, request), 400, 414)


async def test_unknown_expectation_is_417_json(service: Service, connect: Any) -> None:
    request = service.post(service.batch(5), b"Expect: 200-maybe")

    assert_refused(await exchange(connect, request), 417)


# --- bodies and their framing --------------------------------------------------------------


async def test_gzip_bomb_is_413_json(service: Service, connect: Any) -> None:
    # 64 MiB of zeros in about 64 KiB: within MAX_BODY_BYTES on the wire, a thousand times
    # over it once inflated.
    bomb = gzip.compress(b"0" * (64 << 20), compresslevel=9)
    assert len(bomb) < MAX_BODY_BYTES
    request = service.post(bomb, b"Content-Encoding: gzip")

    assert_refused(await exchange(connect, request), 413)


async def test_deflate_bomb_is_413_json(service: Service, connect: Any) -> None:
    bomb = zlib.compress(b" " * (64 << 20), 9)
    request = service.post(bomb, b"Content-Encoding: deflate")

    assert_refused(await exchange(connect, request), 413)


async def test_gzip_batch_is_stored(service: Service, connect: Any) -> None:
    """The encoding itself is fine: a gzipped batch is a batch."""
    request = service.post(gzip.compress(service.batch(6)), b"Content-Encoding: gzip")

    answer = await exchange(connect, request)

    assert answer is not None
    assert answer.status == 202, answer


async def test_gzip_header_on_a_plain_body_is_400_json(service: Service, connect: Any) -> None:
    request = service.post(service.batch(7), b"Content-Encoding: gzip")

    assert_refused(await exchange(connect, request), 400)


async def test_truncated_gzip_body_is_400_json(service: Service, connect: Any) -> None:
    compressed = gzip.compress(service.batch(8))
    request = service.post(compressed[: len(compressed) // 2], b"Content-Encoding: gzip")

    assert_refused(await exchange(connect, request), 400)


async def test_unknown_content_encoding_is_refused_as_json(service: Service, connect: Any) -> None:
    request = service.post(service.batch(9), b"Content-Encoding: snappy-ish")

    assert_refused(await exchange(connect, request), 400, 415)


async def test_body_shorter_than_its_content_length_is_closed_without_an_answer(
    service: Service, connect: Any
) -> None:
    body = service.batch(10)
    request = service.post(body, b"Content-Length: %d" % (len(body) + 100))

    answer = await exchange(connect, request, half_close=True)

    # The service cannot know the batch: it waits for the rest, then sees the client leave.
    if answer is not None:
        assert_refused(answer, 400)


async def test_body_longer_than_its_content_length_is_refused_as_json(
    service: Service, connect: Any
) -> None:
    body = service.batch(11)
    request = service.post(body, b"Content-Length: %d" % (len(body) - 10), close=False)
    connection: Connection = await connect()
    await connection.send(request)

    first = await connection.answer()
    # The rest of the body is read as the next request: not HTTP at all.
    second = await connection.answer()

    assert_refused(first, 400)
    if second is not None:
        assert_refused(second, 400)
    assert await connection.closed()


async def test_content_length_that_is_not_a_number_is_400_json(
    service: Service, connect: Any
) -> None:
    request = service.post(service.batch(12), b"Content-Length: twelve")

    assert_refused(await exchange(connect, request), 400)


async def test_negative_content_length_is_400_json(service: Service, connect: Any) -> None:
    request = service.post(service.batch(13), b"Content-Length: -5")

    assert_refused(await exchange(connect, request), 400)


async def test_two_different_content_lengths_are_400_json(service: Service, connect: Any) -> None:
    body = service.batch(14)
    request = service.post(
        body, b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)
    )

    assert_refused(await exchange(connect, request), 400)


async def test_content_length_with_chunked_encoding_is_400_json(
    service: Service, connect: Any
) -> None:
    body = service.batch(15)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    request = service.post(
        chunked, b"Content-Length: %d" % len(chunked), b"Transfer-Encoding: chunked"
    )

    assert_refused(await exchange(connect, request), 400)


async def test_huge_declared_length_is_413_json(service: Service, connect: Any) -> None:
    request = service.post(b"{", b"Content-Length: %d" % (1 << 40))

    assert_refused(await exchange(connect, request), 413)


async def test_chunked_batch_is_stored(service: Service, connect: Any) -> None:
    body = service.batch(16)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    request = service.post(chunked + b"0\r\n\r\n", b"Transfer-Encoding: chunked")

    answer = await exchange(connect, request)

    assert answer is not None
    assert answer.status == 202, answer


@pytest.mark.parametrize(
    "size_line",
    [b"zz", b"-1", b"0x10", b"ffffffffffffffffffffffff", b"1 1", b""],
    ids=["not-hex", "negative", "0x-prefix", "overflowing", "inner-space", "empty"],
)
async def test_chunk_with_a_bad_size_is_400_json(
    service: Service, connect: Any, size_line: bytes
) -> None:
    body = service.batch(17)
    chunked = b"%s\r\n%s\r\n0\r\n\r\n" % (size_line, body)
    request = service.post(chunked, b"Transfer-Encoding: chunked")

    assert_refused(await exchange(connect, request), 400, 413)


async def test_chunks_over_the_body_limit_are_413_json(service: Service, connect: Any) -> None:
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b" " * 16 * 1024)
    request = service.post(b"{" + chunk * 8 + b"0\r\n\r\n", b"Transfer-Encoding: chunked")

    assert_refused(await exchange(connect, request), 400, 413)


async def test_chunked_body_cut_short_is_closed_without_an_answer(
    service: Service, connect: Any
) -> None:
    request = service.post(b"100\r\n" + b"{" * 10, b"Transfer-Encoding: chunked")

    answer = await exchange(connect, request, half_close=True)

    if answer is not None:
        assert_refused(answer, 400)


@pytest.mark.parametrize("depth", [5_000, 100_000])
async def test_deeply_nested_body_is_refused_as_json(
    service: Service, connect: Any, depth: int
) -> None:
    nested = b"[" * depth + b"]" * depth
    for body in (
        nested,
        b'{"device_id": "%s", "seq": 1, "ppg": %s}' % (service.device.device_id.encode(), nested),
        b'{"x": ' + b"{" * depth + b"}" * depth + b"}",
        b"[" * depth,
    ):
        request = service.post(body)
        if len(request) > MAX_BODY_BYTES:
            assert_refused(await exchange(connect, request), 413)
        else:
            assert_refused(await exchange(connect, request), 400, 422)


# --- request lines, versions, methods ------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(service: Service, connect: Any) -> None:
    requests = [
        service.post(service.batch(20), close=False),
        service.post(b"{not json", close=False),
        service.post(service.batch(21)),
    ]
    connection: Connection = await connect()
    await connection.send(b"".join(requests))

    answers = [await connection.answer() for _ in requests]

    assert [a.status if a else None for a in answers] == [202, 400, 202]
    assert [json.loads(a.body).get("seq") for a in answers if a and a.status == 202] == [20, 21]
    assert await connection.closed()


async def test_http_1_0_batch_is_stored_and_the_connection_closed(
    service: Service, connect: Any
) -> None:
    connection: Connection = await connect()
    await connection.send(service.post(service.batch(22), version=b"HTTP/1.0", close=False))

    answer = await connection.answer()

    assert answer is not None
    assert (answer.version, answer.status) == (b"HTTP/1.0", 202)
    assert await connection.closed()


# HTTP/1.9 is left out: RFC 9112 has a 1.x it does not know read as the 1.x it knows.
@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTPS/1.1", b"HTTP/1", b""])
async def test_unknown_http_version_is_refused_as_json(
    service: Service, connect: Any, version: bytes
) -> None:
    request = head(b"GET", b"/health/liveness", version=version)

    assert_refused(await exchange(connect, request), 400, 505)


async def test_http2_preface_is_refused_as_json(service: Service, connect: Any) -> None:
    answer = await exchange(connect, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

    assert_refused(answer, 400, 505)


@pytest.mark.parametrize("method", [b"FOOBAR", b"TRACE", b"PROPFIND", b"M" * 1_000])
async def test_unknown_method_is_refused_as_json(
    service: Service, connect: Any, method: bytes
) -> None:
    answer = await exchange(connect, head(method, INGEST))

    assert_refused(answer, 400, 405, 501)
    assert answer is not None
    if answer.status == 405:
        assert answer.headers["allow"] == "POST"


@pytest.mark.parametrize("method", [b"GE(T", b"G T", b"\xff\xfe", b"GET\x00"])
async def test_method_with_invalid_characters_is_400_json(
    service: Service, connect: Any, method: bytes
) -> None:
    assert_refused(await exchange(connect, head(method, b"/health/liveness")), 400)


async def test_method_longer_than_a_request_line_is_refused_as_json(
    service: Service, connect: Any
) -> None:
    assert_refused(await exchange(connect, head(b"M" * 100_000, INGEST)), 400, 414, 501)


async def test_connect_to_another_host_is_refused_as_json(service: Service, connect: Any) -> None:
    answer = await exchange(connect, head(b"CONNECT", b"example.com:443"))

    assert_refused(answer, 400, 404, 405)


async def test_garbage_instead_of_a_request_is_400_json(service: Service, connect: Any) -> None:
    answer = await exchange(connect, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40)

    assert_refused(answer, 400)


@pytest.mark.parametrize(
    "handshake",
    [
        (),
        (b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13"),
        (
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 99",
        ),
        (
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: not base64 at all",
            b"Sec-WebSocket-Version: 13",
        ),
    ],
    ids=["no-upgrade", "no-key", "unknown-version", "bad-key"],
)
async def test_broken_websocket_handshake_is_refused_as_json(
    service: Service, connect: Any, handshake: tuple[bytes, ...]
) -> None:
    token = b"Authorization: Bearer " + service.device.token.encode()
    request = head(b"GET", b"/ingestion/ws", token, *handshake)

    assert_refused(await exchange(connect, request), 400, 426)


# --- query strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        b"limit=" + b"9" * 5_000,
        b"limit=\xc2\xb2",  # superscript two: a digit to str.isdigit, not to int()
        b"limit=%C2%B2",
        b"since=" + b"9" * 5_000,
        b"device_id=%FF%FE",
        b"device_id=\xff",
        b"open=%00",
    ],
    ids=[
        "limit-5000-digits",
        "limit-superscript",
        "limit-superscript-escaped",
        "since-5000-digits",
        "device-id-not-utf8-escaped",
        "device-id-not-utf8-raw",
        "open-nul",
    ],
)
async def test_bad_alerts_parameter_is_refused_as_json(
    service: Service, connect: Any, query: bytes
) -> None:
    answer = await exchange(connect, head(b"GET", b"/alerts?" + query, OPERATOR))

    assert_refused(answer, 400, 422)


def test_every_stored_batch_is_a_valid_batch_of_the_device(service: Service) -> None:
    """Nothing a broken request carried reached the readings stream (run last)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        entries = cast(StreamEntries, client.xrange(Keys(service.key_prefix).readings))
    finally:
        client.close()

    assert entries
    for stored in batches_of(entries):
        assert decode_batch(stored.batch).device_id == service.device.device_id
