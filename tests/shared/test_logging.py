"""Central logging: JSON lines on stdout, daily files, unhandled errors, Logstash, redaction.

Every test sets logging up through ``setup_logging`` (the ``start_logging`` fixture) and
takes it down again, leaving loguru with a plain stderr sink as on import. The clock that
drives the daily files is the records' time, set here with ``logger.patch``.
"""

import asyncio
import contextlib
import dataclasses
import gc
import gzip
import io
import json
import logging
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from loguru import logger

from service.app import create_app
from service.appkeys import SETTINGS
from service.edge import instrumented
from shared.logs import Logs, install_loop_handler, setup_logging
from shared.redact import REDACTED
from shared.settings import ServiceSettings, SettingsError, load_settings
from tests.support.env import Device

if TYPE_CHECKING:
    from loguru import Record

Client = TestClient[web.Request, web.Application]
URL = "/ingestion/ppg"
SEED_FIELDS = ("timestamp", "level", "message", "context", "service", "version", "environment")
DEADLINE = 10.0

StartLogging = Callable[..., Logs]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
def start_logging(log_dir: Path) -> Iterator[StartLogging]:
    """``setup_logging`` with test settings (``overrides`` on top), closed after the test."""
    started: list[Logs] = []

    def start(*, stream: IO[str] | None = None, stdout: bool = False, **overrides: Any) -> Logs:
        defaults: dict[str, Any] = {
            "pod_name": "pod-test",
            "environment": "test",
            "log_dir": str(log_dir),
            "enable_file_logging": True,
        }
        settings = ServiceSettings(**{**defaults, **overrides})
        if stream is None and not stdout:
            stream = io.StringIO()
        logs = setup_logging(settings, program="pulsecal-test", stream=stream)
        started.append(logs)
        return logs

    yield start
    for logs in started:
        logs.close()
    # setup_logging removed loguru's default sink; put an equivalent back for other tests.
    logger.add(lambda message: sys.stderr.write(message))


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def files(log_dir: Path, kind: str) -> list[Path]:
    return sorted(log_dir.glob(f"{kind}-*.log"))


def only_file(log_dir: Path, kind: str) -> list[dict[str, Any]]:
    paths = files(log_dir, kind)
    assert len(paths) == 1, paths
    return read_lines(paths[0])


def log_at(when: datetime, message: str, *, level: str = "INFO") -> None:
    def set_time(record: "Record") -> None:
        record["time"] = when

    logger.patch(set_time).log(level, message)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def everything_written(log_dir: Path, *streams: str) -> str:
    return "".join(streams) + "".join(
        path.read_bytes().decode(errors="replace") for path in log_dir.iterdir()
    )


# ------------------------------------------------------------------------------ line shape


def test_every_line_is_flat_json_with_the_seed_fields(
    start_logging: StartLogging, log_dir: Path
) -> None:
    stream = io.StringIO()
    start_logging(stream=stream)

    logger.bind(deviceId="dev-001").info("Metric ingested")
    logger.bind(context="IngestionService", batch={"seq": 7, "samples": [1, 2]}).warning("slow")
    try:
        raise RuntimeError("it broke")
    except RuntimeError:
        logger.exception("caught {}", "something")

    stdout = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert stdout == only_file(log_dir, "application")
    assert len(stdout) == 3
    for line in stdout:
        assert all(isinstance(line[field], str) for field in SEED_FIELDS), line
        assert line["service"] == "pulsecal-test"
        assert line["environment"] == "test"
        assert line["pod"] == "pod-test"
        assert datetime.fromisoformat(line["timestamp"]).utcoffset() == timedelta(0)
    ingested, slow, caught = stdout
    assert (ingested["level"], ingested["message"]) == ("info", "Metric ingested")
    assert ingested["context"] == __name__
    assert ingested["deviceId"] == "dev-001"
    assert slow["context"] == "IngestionService"
    assert slow["batch"] == {"seq": 7, "samples": [1, 2]}
    assert (caught["level"], caught["message"]) == ("error", "caught something")
    assert caught["exception"].startswith("Traceback (most recent call last):")
    assert caught["exception"].endswith("RuntimeError: it broke")


def test_level_comes_from_log_level(start_logging: StartLogging) -> None:
    stream = io.StringIO()
    start_logging(stream=stream, log_level="warning")

    logger.info("not shown")
    logger.warning("shown")

    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["shown"]


def test_trace_ids_are_added_inside_a_span(start_logging: StartLogging) -> None:
    trace_sdk = pytest.importorskip("opentelemetry.sdk.trace")
    provider = trace_sdk.TracerProvider()
    stream = io.StringIO()
    start_logging(stream=stream)

    with provider.get_tracer(__name__).start_as_current_span("ingest") as span:
        logger.info("inside")
    logger.info("outside")
    provider.shutdown()

    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in outside


# ------------------------------------------------------------------------------ files


def test_files_are_named_by_utc_day_and_rotate_at_midnight(
    start_logging: StartLogging, log_dir: Path
) -> None:
    start_logging()

    log_at(datetime(2024, 1, 15, 23, 59, 59, 999_000, tzinfo=UTC), "last of the 15th")
    # 01:30 in UTC+2 is still the 15th in UTC.
    log_at(datetime(2024, 1, 16, 1, 30, tzinfo=timezone(timedelta(hours=2))), "also the 15th")
    log_at(datetime(2024, 1, 16, 0, 0, tzinfo=UTC), "first of the 16th", level="ERROR")
    log_at(datetime(2024, 1, 16, 12, 0, tzinfo=UTC), "noon of the 16th")

    assert [p.name for p in files(log_dir, "application")] == [
        "application-2024-01-15.log",
        "application-2024-01-16.log",
    ]
    assert [line["message"] for line in read_lines(log_dir / "application-2024-01-15.log")] == [
        "last of the 15th",
        "also the 15th",
    ]
    assert [line["timestamp"] for line in read_lines(log_dir / "application-2024-01-16.log")] == [
        "2024-01-16T00:00:00.000Z",
        "2024-01-16T12:00:00.000Z",
    ]
    assert [p.name for p in files(log_dir, "error")] == ["error-2024-01-16.log"]


def test_old_days_are_compressed_and_pruned_after_retention(
    start_logging: StartLogging, log_dir: Path
) -> None:
    log_dir.mkdir()
    for name in (
        "application-2024-01-10.log",  # older than three days: pruned
        "error-2024-01-13.log.gz",  # older than three days: pruned
        "rejections-2024-01-14.log",  # kept, compressed
        "error-2024-01-14.log.gz.4242.tmp",  # an interrupted compression: removed
        "notes.txt",  # not ours: left alone
    ):
        (log_dir / name).write_text("{}\n")
    logs = start_logging(log_retention_days=3, log_compression="gz")

    log_at(datetime(2024, 1, 15, 10, 0, tzinfo=UTC), "on the 15th")
    log_at(datetime(2024, 1, 16, 10, 0, tzinfo=UTC), "on the 16th")
    logs.close()  # waits for the background maintenance

    assert sorted(p.name for p in log_dir.iterdir()) == [
        "application-2024-01-15.log.gz",
        "application-2024-01-16.log",
        "notes.txt",
        "rejections-2024-01-14.log.gz",
    ]
    with gzip.open(log_dir / "application-2024-01-15.log.gz", "rt") as f:
        assert [json.loads(line)["message"] for line in f] == ["on the 15th"]


def test_errors_also_go_to_the_error_file(start_logging: StartLogging, log_dir: Path) -> None:
    start_logging()

    logger.info("fine")
    logger.warning("hmm")
    logger.error("bad")
    logger.critical("worse")

    assert [line["message"] for line in only_file(log_dir, "application")] == [
        "fine",
        "hmm",
        "bad",
        "worse",
    ]
    assert [line["message"] for line in only_file(log_dir, "error")] == ["bad", "worse"]
    assert files(log_dir, "exceptions") == files(log_dir, "rejections") == []


def test_file_logging_off_writes_no_files(start_logging: StartLogging, log_dir: Path) -> None:
    stream = io.StringIO()
    start_logging(stream=stream, enable_file_logging=False)

    logger.error("only on stdout")

    assert json.loads(stream.getvalue())["message"] == "only on stdout"
    assert not log_dir.exists()


def test_an_unusable_log_dir_is_reported_once_and_logging_goes_on(
    start_logging: StartLogging, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    stream = io.StringIO()
    start_logging(stream=stream, log_dir=str(not_a_dir))

    for i in range(3):
        logger.error("still logging {}", i)

    logged = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert [m for m in logged if m.startswith("still logging")] == [
        f"still logging {i}" for i in range(3)
    ]
    (complaint,) = capsys.readouterr().err.splitlines()
    assert complaint.startswith(f"log files in {not_a_dir} failing:")


# ------------------------------------------------------------------------------ unhandled


def test_an_uncaught_exception_lands_in_the_exceptions_file_with_its_traceback(
    start_logging: StartLogging, log_dir: Path
) -> None:
    start_logging()

    try:
        raise LookupError("nobody caught me")
    except LookupError:
        sys.excepthook(*sys.exc_info())

    (line,) = only_file(log_dir, "exceptions")
    assert line["level"] == "error"
    assert line["unhandled"] == "exception"
    assert "in test_an_uncaught_exception_lands" in line["exception"]
    assert line["exception"].endswith("LookupError: nobody caught me")
    assert only_file(log_dir, "error") == [line]


def test_an_exception_ending_a_thread_lands_in_the_exceptions_file(
    start_logging: StartLogging, log_dir: Path
) -> None:
    start_logging()

    def work() -> None:
        raise ValueError("thread died")

    thread = threading.Thread(target=work, name="worker-1")
    thread.start()
    thread.join()

    (line,) = only_file(log_dir, "exceptions")
    assert line["thread"] == "worker-1"
    assert line["exception"].endswith("ValueError: thread died")


def test_an_exception_leaving_the_logging_block_is_logged_before_closing(
    start_logging: StartLogging, log_dir: Path
) -> None:
    logs = start_logging()

    with pytest.raises(KeyError), logs:
        raise KeyError("main failed")

    (line,) = only_file(log_dir, "exceptions")
    assert line["exception"].endswith("KeyError: 'main failed'")


async def test_a_task_error_nobody_retrieved_lands_in_the_rejections_file(
    start_logging: StartLogging, log_dir: Path
) -> None:
    start_logging()
    loop = asyncio.get_running_loop()
    install_loop_handler(loop)

    async def fail() -> None:
        raise ValueError("rejected")

    task = asyncio.create_task(fail())
    await asyncio.wait([task])
    del task
    gc.collect()  # the task reports its unretrieved error when it is collected
    loop.set_exception_handler(None)

    (line,) = only_file(log_dir, "rejections")
    assert line["unhandled"] == "rejection"
    assert "Task exception was never retrieved" in line["message"]
    assert "in fail" in line["exception"]
    assert line["exception"].endswith("ValueError: rejected")
    assert files(log_dir, "exceptions") == []


async def test_a_failing_loop_callback_lands_in_the_exceptions_file(
    start_logging: StartLogging, log_dir: Path
) -> None:
    start_logging()
    loop = asyncio.get_running_loop()
    install_loop_handler(loop)

    def callback() -> None:
        raise ZeroDivisionError("callback failed")

    loop.call_soon(callback)
    await asyncio.sleep(0.01)
    loop.set_exception_handler(None)

    (line,) = only_file(log_dir, "exceptions")
    assert line["unhandled"] == "exception"
    assert line["exception"].endswith("ZeroDivisionError: callback failed")
    assert files(log_dir, "rejections") == []


# ------------------------------------------------------------------------------ stdlib


def test_standard_library_logging_is_routed_and_the_access_log_stays_quiet(
    start_logging: StartLogging, log_dir: Path
) -> None:
    start_logging()

    logging.getLogger("aiohttp.server").warning("peer went away: %s", "reset")
    logging.getLogger("aiohttp.access").info('127.0.0.1 "POST /ingestion/ppg" 202')
    logging.getLogger("psycopg.pool").debug("below the level")
    try:
        raise OSError("connection refused")
    except OSError:
        logging.getLogger("redis").exception("ping failed")

    routed, failed = only_file(log_dir, "application")
    assert (routed["context"], routed["level"]) == ("aiohttp.server", "warning")
    assert routed["message"] == "peer went away: reset"
    assert (failed["context"], failed["level"]) == ("redis", "error")
    assert failed["exception"].endswith("OSError: connection refused")


def test_closing_restores_hooks_and_stdlib_logging(start_logging: StartLogging) -> None:
    hooks = (sys.excepthook, threading.excepthook)
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    before = (list(root.handlers), root.level, access.level)
    logs = start_logging()
    assert sys.excepthook is not hooks[0]

    logs.close()
    logs.close()

    assert (sys.excepthook, threading.excepthook) == hooks
    assert (list(root.handlers), root.level, access.level) == before


# ------------------------------------------------------------------------------ Logstash


class FakeLogstash:
    """A TCP listener standing in for Logstash's json_lines input."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def messages(self) -> list[str]:
        return [line["message"] for line in self.lines]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and hang up on every connection."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                self.lines.append(json.loads(line))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._writers.discard(writer)
            self._connections.discard(task)


@pytest.fixture
async def logstash() -> AsyncIterator[FakeLogstash]:
    server = FakeLogstash()
    await server.start()
    yield server
    await server.stop()


async def test_logstash_receives_every_line_as_json(
    start_logging: StartLogging, logstash: FakeLogstash
) -> None:
    logs = start_logging(logstash_host="127.0.0.1", logstash_port=logstash.port)

    logger.bind(deviceId="dev-001").info("Metric ingested")
    for i in range(500):
        logger.info("line {}", i)
    logs.close()  # sends what is still queued

    await eventually(lambda: len(logstash.lines) == 501, "all lines shipped")
    first = logstash.lines[0]
    assert all(isinstance(first[field], str) for field in SEED_FIELDS)
    assert (first["message"], first["deviceId"]) == ("Metric ingested", "dev-001")
    assert logstash.messages()[1:] == [f"line {i}" for i in range(500)]
    assert logs.logstash_dropped == 0


async def test_logstash_away_never_blocks_drops_and_counts_then_lines_flow_again(
    start_logging: StartLogging, logstash: FakeLogstash
) -> None:
    logs = start_logging(
        logstash_host="127.0.0.1",
        logstash_port=logstash.port,
        logstash_buffer_lines=1000,
        logstash_reconnect_max=0.05,
    )
    shipper = logs.logstash
    assert shipper is not None
    logger.info("before the outage")
    await eventually(lambda: "before the outage" in logstash.messages(), "first line shipped")

    await logstash.stop()
    await eventually(lambda: not shipper.connected, "the shipper noticed the hang-up")
    queued, dropped = shipper.buffered, shipper.dropped
    for i in range(10_000):
        logger.info("while away {}", i)

    kept = 1000 - queued
    assert shipper.buffered == 1000
    assert shipper.dropped - dropped == 10_000 - kept
    assert logs.logstash_dropped == shipper.dropped

    await logstash.start()  # same port
    recovered = f"reachable again; {10_000 - kept} lines dropped while away"
    await eventually(
        lambda: any(recovered in m for m in logstash.messages()), "the backlog and the recovery"
    )
    logger.info("after the outage")
    await eventually(lambda: "after the outage" in logstash.messages(), "lines flow again")
    messages = logstash.messages()
    assert any("unreachable" in m for m in messages)
    assert f"while away {kept - 1}" in messages
    assert f"while away {kept}" not in messages


async def test_logstash_absent_at_start_does_not_hold_up_logging(
    start_logging: StartLogging, logstash: FakeLogstash
) -> None:
    port = logstash.port
    await logstash.stop()
    stream = io.StringIO()
    logs = start_logging(
        stream=stream,
        logstash_host="127.0.0.1",
        logstash_port=port,
        logstash_buffer_lines=10,
    )

    for i in range(100):
        logger.info("line {}", i)

    assert len(stream.getvalue().splitlines()) >= 100
    assert logs.logstash_dropped >= 90


# ------------------------------------------------------------------------------ redaction


def test_secret_fields_and_credentials_are_redacted_everywhere(
    start_logging: StartLogging, log_dir: Path
) -> None:
    stream = io.StringIO()
    start_logging(stream=stream)
    hunter, bound_value = "hunter2-pw", "tok-bound"
    request = {
        "user": "alice",
        "password": hunter,
        "headers": {"Authorization": "Bearer tok-in-headers", "Accept": "*/*"},
        "attempts": [{"api_key": "key-in-list"}],
    }

    logger.bind(request=request, access_token=bound_value).info("login {}", request)
    logger.warning("cannot connect to redis://:redis-pw@10.0.0.1:6379/0")
    logger.info("callback url https://x.example/cb?token=tok-in-query&state=1")

    written = everything_written(log_dir, stream.getvalue())
    for secret in (
        "hunter2-pw",
        "tok-in-headers",
        "key-in-list",
        "tok-bound",
        "redis-pw",
        "tok-in-query",
    ):
        assert secret not in written
    bound, url, query = (json.loads(line) for line in stream.getvalue().splitlines())
    assert bound["request"]["user"] == "alice"
    assert bound["request"]["password"] == REDACTED
    assert bound["request"]["headers"] == {"Authorization": REDACTED, "Accept": "*/*"}
    assert bound["access_token"] == REDACTED
    assert url["message"] == "cannot connect to redis://:[REDACTED]@10.0.0.1:6379/0"
    assert query["message"].endswith("token=[REDACTED]&state=1")
    # The caller's objects are left as they were.
    assert request["password"] == hunter


def test_secrets_in_a_traceback_are_redacted(start_logging: StartLogging, log_dir: Path) -> None:
    stream = io.StringIO()
    start_logging(stream=stream)

    try:
        raise PermissionError("rejected header Authorization: Bearer tok-in-error")
    except PermissionError:
        logger.exception("auth failed")

    assert "tok-in-error" not in everything_written(log_dir, stream.getvalue())
    assert "Authorization: [REDACTED]" in json.loads(stream.getvalue())["exception"]


async def test_a_bad_token_sent_to_the_service_reaches_no_sink(
    client: Client,
    device: Device,
    start_logging: StartLogging,
    log_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = f"pct_leak-{uuid.uuid4().hex}"
    start_logging(stdout=True, log_level="trace")  # stdout: capsys's while the test runs

    for headers in (
        {"Authorization": f"Bearer {token}"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
    ):
        response = await client.post(URL, json=device.batch(1), headers=headers)
        assert response.status == 401
    response = await client.post(URL, data=token.encode(), headers=device.headers)
    assert response.status == 400

    assert token not in everything_written(log_dir, capsys.readouterr().out)


async def test_a_token_in_an_access_log_line_is_redacted(
    aiohttp_client: Callable[[TestServer], Awaitable[Client]],
    settings: ServiceSettings,
    device: Device,
    start_logging: StartLogging,
    log_dir: Path,
) -> None:
    token = f"pct_leak-{uuid.uuid4().hex}"
    stream = io.StringIO()
    start_logging(stream=stream)
    # Someone turns the access log on with the Authorization header in its format.
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    server = TestServer(create_app(settings))
    await server.start_server(access_log_format='%r %s "%{Authorization}i"')
    client = await aiohttp_client(server)

    for scheme in ("Bearer", "Basic"):
        response = await client.post(
            URL, json=device.batch(1), headers={"Authorization": f"{scheme} {token}"}
        )
        assert response.status == 401

    def access_lines() -> list[str]:
        return [line for line in stream.getvalue().splitlines() if "POST /ingestion/ppg" in line]

    await eventually(lambda: len(access_lines()) == 2, "both requests in the access log")
    assert token not in everything_written(log_dir, stream.getvalue())
    assert all("[REDACTED]" in line for line in access_lines())


# ------------------------------------------------------------------------------ settings


def test_logging_settings_are_parsed_and_checked() -> None:
    settings = load_settings(
        {
            "LOG_RETENTION_DAYS": "30",
            "LOG_COMPRESSION": "GZ",
            "LOG_REDACT_FIELDS": " Token, x-session ,,",
            "LOGSTASH_BUFFER_LINES": "500",
        },
        ServiceSettings,
    )

    assert (settings.log_retention_days, settings.log_compression) == (30, "gz")
    assert settings.log_redact_fields == ("token", "x-session")
    assert settings.logstash_buffer_lines == 500
    assert "password" in ServiceSettings().log_redact_fields
    with pytest.raises(SettingsError, match="LOG_COMPRESSION='zip'"):
        load_settings({"LOG_COMPRESSION": "zip"}, ServiceSettings)
    with pytest.raises(SettingsError, match="LOG_REDACT_FIELDS"):
        load_settings({"LOG_REDACT_FIELDS": "pass word"}, ServiceSettings)
    with pytest.raises(SettingsError, match="LOG_RETENTION_DAYS"):
        load_settings({"LOG_RETENTION_DAYS": "0"}, ServiceSettings)


def test_the_default_environment_is_production() -> None:
    assert ServiceSettings().environment == "production"
    assert load_settings({}, ServiceSettings).environment == "production"
    assert load_settings({"ENVIRONMENT": "staging"}, ServiceSettings).environment == "staging"


@pytest.mark.parametrize("environment", ["development", "dev", "local", "production"])
def test_variable_values_never_appear_in_a_traceback(
    start_logging: StartLogging, environment: str
) -> None:
    stream = io.StringIO()
    start_logging(stream=stream, environment=environment)

    value = uuid.uuid4().hex  # not in the source lines a traceback quotes

    def check(argument: str) -> None:
        raise ValueError("bad")

    try:
        check(value)
    except ValueError:
        logger.exception("failed")

    (line,) = (json.loads(line) for line in stream.getvalue().splitlines())
    assert line["exception"].endswith("ValueError: bad")
    assert value not in stream.getvalue()


def test_the_configured_secrets_are_replaced_wherever_they_appear(
    start_logging: StartLogging, log_dir: Path
) -> None:
    admin, metrics, password = (f"s{uuid.uuid4().hex[:12]}" for _ in range(3))
    database_url = f"postgresql://app:{password}%40x@db.example:5432/app"
    stream = io.StringIO()
    start_logging(
        stream=stream, admin_token=admin, metrics_token=metrics, database_url=database_url
    )

    logger.info("tried {} then {}", admin, metrics)
    logger.bind(attempt=[f"{password}@x"]).warning("connect failed")
    logger.info("dsn host=db.example password={}@x", password)

    tried, failed, dsn = (json.loads(line) for line in stream.getvalue().splitlines())
    assert tried["message"] == f"tried {REDACTED} then {REDACTED}"
    assert failed["attempt"] == [REDACTED]
    assert dsn["message"] == f"dsn host=db.example password={REDACTED}"
    written = everything_written(log_dir, stream.getvalue())
    assert all(secret not in written for secret in (admin, metrics, password))


@pytest.mark.parametrize("environment", [ServiceSettings().environment, "development"])
async def test_a_server_fault_holding_secrets_reaches_no_sink(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    settings: ServiceSettings,
    start_logging: StartLogging,
    log_dir: Path,
    logstash: FakeLogstash,
    capsys: pytest.CaptureFixture[str],
    environment: str,
) -> None:
    admin, metrics = f"adm-{uuid.uuid4().hex}", f"met-{uuid.uuid4().hex}"
    secret_settings = dataclasses.replace(
        settings, admin_token=admin, metrics_token=metrics, environment=environment
    )
    logs = start_logging(
        stdout=True,  # capsys's while the test runs
        environment=environment,
        admin_token=admin,
        metrics_token=metrics,
        logstash_host="127.0.0.1",
        logstash_port=logstash.port,
    )

    async def fault(request: web.Request) -> web.Response:
        configured = request.app[SETTINGS]
        admin_token, metrics_token = configured.admin_token, configured.metrics_token
        logger.warning("the upstream said no to {}", metrics_token)
        try:
            raise LookupError(metrics_token)
        except LookupError as e:
            raise RuntimeError(f"upstream refused {admin_token}") from e

    app = create_app(secret_settings)
    app.router.add_get("/fault", instrumented("/fault", fault))
    client = await aiohttp_client(app)

    response = await client.get("/fault")

    assert response.status == 500
    assert (await response.json())["error"]["code"] == "internal"
    await eventually(
        lambda: any(line["level"] == "error" for line in logstash.lines), "the error shipped"
    )
    logs.close()
    output = capsys.readouterr()
    (error,) = (line for line in logstash.lines if line["level"] == "error")
    assert error["message"] == "unhandled error on GET /fault"
    assert error["exception"].endswith(f"RuntimeError: upstream refused {REDACTED}")
    assert f"LookupError: {REDACTED}" in error["exception"]
    shipped = json.dumps(logstash.lines)
    for secret in (admin, metrics):
        assert secret not in everything_written(log_dir, output.out, output.err, shipped)
