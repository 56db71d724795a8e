"""Process-wide logging: one JSON line per record, on stdout, in daily files and to Logstash.

A line is flat JSON: ``timestamp`` (UTC, ISO 8601, milliseconds), ``level``, ``message``,
``context`` (a bound ``context``, else the stdlib logger's or the Python module's name),
``service``, ``version``, ``environment``, ``pod``, then every bound extra field
(``deviceId``...), ``trace_id``/``span_id`` inside an OpenTelemetry span, and ``exception``
(the traceback) when there is one. The record is encoded once and the same bytes go to
every output.

Outputs: stdout always; with ``ENABLE_FILE_LOGGING`` the daily files of ``shared.logfiles``
(``application`` all, ``error`` level >= ERROR, ``exceptions`` and ``rejections`` the
unhandled ones); with ``LOGSTASH_HOST`` the shipper of ``shared.logstash``. Standard-library
logging (aiohttp, asyncio, redis, psycopg) is routed into the same records; aiohttp's access
log stays off. Unhandled exceptions arrive through ``sys.excepthook``,
``threading.excepthook`` and, once ``install_loop_handler`` has been called, the event loop's
exception handler: errors of tasks and futures nobody awaited are "rejections", the rest
(a failing callback, say) "exceptions".

Secrets: a loguru patcher redacts the message and the bound fields of every record before any
sink sees it (``shared.redact``); tracebacks are redacted as they are written. Variable
values in tracebacks (loguru's ``diagnose``) are shown only when ``ENVIRONMENT`` is
``development``, ``dev`` or ``local``: they can hold anything, a token included.
"""

import asyncio
import contextlib
import logging
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import msgspec
from loguru import logger

from .logfiles import SECONDS_PER_DAY, DailyFiles
from .logstash import LogstashShipper
from .redact import Redactor
from .settings import Settings
from .version import build_version

if TYPE_CHECKING:
    from loguru import Message, Record

__all__ = ("Logs", "install_loop_handler", "setup_logging")

DIAGNOSE_ENVIRONMENTS = frozenset({"development", "dev", "local"})

_ERROR_NO = 40
_FILE_KINDS = {
    (False, None): ("application",),
    (True, None): ("application", "error"),
    (True, "exception"): ("application", "error", "exceptions"),
    (True, "rejection"): ("application", "error", "rejections"),
    (False, "exception"): ("application", "exceptions"),
    (False, "rejection"): ("application", "rejections"),
}
_STDLIB_LEVELS = {
    logging.CRITICAL: "CRITICAL",
    logging.ERROR: "ERROR",
    logging.WARNING: "WARNING",
    logging.INFO: "INFO",
    logging.DEBUG: "DEBUG",
}
# The stdlib has no TRACE: at trace, its DEBUG records come too.
_STDLIB_THRESHOLDS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Per-request detail is the sidecar's telemetry, not log lines.
_QUIET_LOGGERS = {"aiohttp.access": logging.WARNING}


def _unpatched(record: "Record") -> None:
    """Loguru cannot unset its patcher; this is what closing leaves behind."""


class _JsonSink:
    """Encodes a record once and hands the line to every output."""

    def __init__(
        self,
        *,
        static: dict[str, str],
        stream: IO[str],
        files: DailyFiles | None,
        shipper: LogstashShipper | None,
        redactor: Redactor,
    ) -> None:
        self._static = static
        self._stream = stream
        self._files = files
        self._shipper = shipper
        self._redactor = redactor
        self._encode = msgspec.json.Encoder(enc_hook=self._fallback).encode
        self._second = -1
        self._second_text = ""

    def _fallback(self, value: object) -> str:
        return self._redactor.text(str(value))

    def _timestamp(self, seconds: int, microseconds: int) -> str:
        if seconds != self._second:
            self._second = seconds
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return f"{self._second_text}.{microseconds // 1000:03d}Z"

    def __call__(self, message: "Message") -> None:
        record = message.record
        extra = record["extra"]
        when = record["time"]
        seconds = int(when.timestamp())
        level = record["level"]
        line: dict[str, Any] = {
            "timestamp": self._timestamp(seconds, when.microsecond),
            "level": level.name.lower(),
            "message": record["message"],
            "context": extra.get("context") or record["name"],
            **self._static,
        }
        for key, value in extra.items():
            if key not in line:
                line[key] = value
        if record["exception"] is not None:
            # The handler's format is empty: the formatted message is "\n" + the traceback.
            line["exception"] = self._redactor.text(message.strip("\n"))
        data = self._encode(line) + b"\n"
        if self._shipper is not None:
            self._shipper.put(data)
        if self._files is not None:
            is_error = level.no >= _ERROR_NO
            kinds = (
                _FILE_KINDS.get((is_error, extra.get("unhandled"))) or _FILE_KINDS[is_error, None]
            )
            self._files.write(seconds // SECONDS_PER_DAY, data, kinds)
        self._stream.write(data.decode())
        self._stream.flush()


def _patcher(redactor: Redactor) -> Callable[["Record"], None]:
    modules = sys.modules

    def patch(record: "Record") -> None:
        record["message"] = redactor.text(record["message"])
        extra = record["extra"]
        if extra:
            redactor.fields(extra)
        # OpenTelemetry is not a dependency of logging: its trace ids are added once someone
        # (the tracing setup) has imported it, and looking that up is one dict access.
        trace = modules.get("opentelemetry.trace")
        if trace is not None:
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                extra["trace_id"] = format(context.trace_id, "032x")
                extra["span_id"] = format(context.span_id, "016x")

    return patch


class _InterceptHandler(logging.Handler):
    """Standard-library records into loguru, under the stdlib logger's name as context."""

    def emit(self, record: logging.LogRecord) -> None:
        level = _STDLIB_LEVELS.get(record.levelno, record.levelno)
        exc_info = record.exc_info if record.exc_info and record.exc_info[0] else None
        logger.opt(exception=exc_info).bind(context=record.name).log(level, record.getMessage())


def _log_unhandled(
    exc_info: tuple[type[BaseException], BaseException, types.TracebackType | None],
) -> None:
    logger.opt(exception=exc_info).bind(unhandled="exception", context="sys").error(
        "unhandled exception: {}: {}", exc_info[0].__name__, exc_info[1]
    )


def _excepthook(
    type_: type[BaseException], value: BaseException, tb: types.TracebackType | None
) -> None:
    if issubclass(type_, KeyboardInterrupt):
        sys.__excepthook__(type_, value, tb)
        return
    _log_unhandled((type_, value, tb))


def _threading_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    thread = args.thread.name if args.thread is not None else "?"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    logger.opt(exception=exc_info).bind(
        unhandled="exception", context="threading", thread=thread
    ).error(
        "unhandled exception in thread {}: {}: {}", thread, args.exc_type.__name__, args.exc_value
    )


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    try:
        exception = context.get("exception")
        message = context.get("message") or "unhandled exception in event loop"
        details = {k: repr(v) for k, v in context.items() if k not in ("message", "exception")}
        if not isinstance(exception, BaseException):
            logger.bind(context="asyncio", asyncio=details).error(message)
            return
        # A task's or future's error that nobody retrieved is the asyncio counterpart of
        # an unhandled promise rejection; anything else (a callback that raised) is not.
        kind = "rejection" if "future" in context or "task" in context else "exception"
        logger.opt(exception=exception).bind(
            unhandled=kind, context="asyncio", asyncio=details
        ).error("unhandled {}: {}: {}: {}", kind, message, type(exception).__name__, exception)
    except Exception:  # noqa: BLE001 - a failing handler would hide the error: asyncio's own says it
        loop.default_exception_handler(context)


def install_loop_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Route ``loop``'s unhandled errors to the exceptions and rejections logs."""
    loop.set_exception_handler(_loop_exception)


class Logs:
    """What ``setup_logging`` installed; ``close()`` flushes Logstash and takes it all down."""

    def __init__(
        self,
        *,
        handler_id: int,
        files: DailyFiles | None,
        shipper: LogstashShipper | None,
        intercept: logging.Handler,
        stdlib_levels: dict[str, int],
        previous_hooks: tuple[Any, Any],
    ) -> None:
        self.files = files
        self.logstash = shipper
        self._handler_id = handler_id
        self._intercept = intercept
        self._stdlib_levels = stdlib_levels
        self._previous_hooks = previous_hooks
        self._closed = False

    @property
    def logstash_dropped(self) -> int:
        """Lines that never reached Logstash (0 without Logstash): for the heartbeat."""
        return 0 if self.logstash is None else self.logstash.dropped

    def close(self, *, timeout: float = 2.0) -> None:
        """Restore the hooks, send what Logstash has queued (within ``timeout``), stop."""
        if self._closed:
            return
        self._closed = True
        if sys.excepthook is _excepthook:
            sys.excepthook = self._previous_hooks[0]
        if threading.excepthook is _threading_excepthook:
            threading.excepthook = self._previous_hooks[1]
        logging.getLogger().removeHandler(self._intercept)
        for name, level in self._stdlib_levels.items():
            logging.getLogger(name).setLevel(level)
        # No record reaches the outputs from here on; a later setup_logging may already
        # have removed the handler.
        with contextlib.suppress(ValueError):
            logger.remove(self._handler_id)
        logger.configure(patcher=_unpatched)
        if self.logstash is not None:
            self.logstash.close(timeout=timeout)
        if self.files is not None:
            self.files.close()

    def __enter__(self) -> "Logs":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        # The exception leaving ``main`` would reach sys.excepthook only after close().
        if exc_type is not None and exc is not None and issubclass(exc_type, Exception):
            _log_unhandled((exc_type, exc, tb))
        self.close()


def setup_logging(settings: Settings, *, program: str, stream: IO[str] | None = None) -> Logs:
    """Replace loguru's sinks with this process's outputs; ``stream`` defaults to stdout."""
    redactor = Redactor(settings.log_redact_fields)
    files = (
        DailyFiles(
            settings.log_dir,
            retention_days=settings.log_retention_days,
            compression=settings.log_compression,
        )
        if settings.enable_file_logging
        else None
    )
    shipper = (
        LogstashShipper(
            settings.logstash_host,
            settings.logstash_port,
            buffer_lines=settings.logstash_buffer_lines,
            reconnect_max=settings.logstash_reconnect_max,
        )
        if settings.logstash_host
        else None
    )
    sink = _JsonSink(
        static={
            "service": program,
            "version": build_version(),
            "environment": settings.environment,
            "pod": settings.pod,
        },
        stream=sys.stdout if stream is None else stream,
        files=files,
        shipper=shipper,
        redactor=redactor,
    )
    logger.remove()
    logger.configure(patcher=_patcher(redactor))
    handler_id = logger.add(
        sink,
        level=settings.log_level.upper(),
        format="",
        colorize=False,
        backtrace=False,
        diagnose=settings.environment.lower() in DIAGNOSE_ENVIRONMENTS,
        catch=True,
    )
    if shipper is not None:
        shipper.start()

    root = logging.getLogger()
    stdlib_levels = {"": root.level}
    intercept = _InterceptHandler()
    root.addHandler(intercept)
    root.setLevel(_STDLIB_THRESHOLDS[settings.log_level])
    for name, level in _QUIET_LOGGERS.items():
        quiet = logging.getLogger(name)
        stdlib_levels[name] = quiet.level
        quiet.setLevel(level)

    previous_hooks = (sys.excepthook, threading.excepthook)
    sys.excepthook = _excepthook
    threading.excepthook = _threading_excepthook
    return Logs(
        handler_id=handler_id,
        files=files,
        shipper=shipper,
        intercept=intercept,
        stdlib_levels=stdlib_levels,
        previous_hooks=previous_hooks,
    )
