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
sink sees it (``shared.redact``); tracebacks are redacted as they are written, before the one
encoded line goes to every output. Besides the shapes ``shared.redact`` recognises, the
secrets in the process's own settings (the tokens, the passwords in its URLs) are replaced
wherever they appear. Tracebacks never show variable values (loguru's ``diagnose`` is off in
every environment): a local variable can hold anything, a token included.

Client errors: what a client can cause (a malformed request, a body that cannot be read, a
hang-up) is logged through ``client_errors``: a WARNING without traceback, at most one line per
kind every ``CLIENT_ERROR_INTERVAL`` seconds, the next saying how many were left out. That
includes aiohttp's own report of a request it could not parse.
"""

import asyncio
import contextlib
import dataclasses
import logging
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import msgspec
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from loguru import logger

from .logfiles import SECONDS_PER_DAY, DailyFiles
from .logstash import LogstashShipper
from .redact import Redactor
from .settings import LoggingSection
from .version import build_version

if TYPE_CHECKING:
    from loguru import Message, Record

__all__ = (
    "CLIENT_ERROR_INTERVAL",
    "Logs",
    "SampledWarnings",
    "client_errors",
    "configured_secrets",
    "install_loop_handler",
    "setup_logging",
)

CLIENT_ERROR_INTERVAL = 10.0

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
# aiohttp's server logs a request it cannot parse at ERROR, with a traceback.
_AIOHTTP_SERVER = "aiohttp.server"
_CLIENT_TEXT_MAX = 200


class SampledWarnings:
    """Warnings a client can cause, sampled: per kind, at most one line every ``interval``
    seconds, the next one counting those left out in between (field ``suppressed``).

    Kinds must come from a bounded set (a route template and a status, an exception class),
    never from the request's own text. A suppressed warning costs a clock read and a
    dictionary update: no record is built.
    """

    def __init__(
        self,
        *,
        interval: float = CLIENT_ERROR_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._due: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(
        self, kind: str, message: str, *args: object, depth: int = 0, **fields: object
    ) -> bool:
        """Log ``message`` (formatted with ``args``, as loguru does; ``fields`` bound) unless
        ``kind`` was logged less than ``interval`` ago; whether it was logged. ``depth``: as
        loguru's, counted from the caller."""
        now = self._clock()
        due = self._due.get(kind)
        if due is not None and now < due:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._due[kind] = now + self.interval
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += f" ({suppressed} more like it not logged)"
        logger.opt(depth=depth + 1).bind(
            client_error=kind, suppressed=suppressed, **fields
        ).warning(message, *args)
        return True

    def reset(self) -> None:
        """Forget what was logged: the next warning of every kind is written."""
        self._due.clear()
        self._suppressed.clear()


# Process-wide like the logger it writes to: every server of the process (and aiohttp's own
# parser errors, through the standard-library bridge) shares one budget per kind.
client_errors = SampledWarnings()


def configured_secrets(settings: LoggingSection) -> list[str]:
    """The secret values in ``settings``: the fields kept out of its repr (the tokens) or
    named like a secret, and the password of every URL."""
    names = Redactor(settings.log_redact_fields)
    secrets: list[str] = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if not isinstance(value, str) or not value:
            continue
        if "://" in value:
            password = urlsplit(value).password
            if password:
                secrets += [password, unquote(password)]
        elif not field.repr or names.is_secret_key(field.name):
            secrets.append(value)
    return secrets


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
        if exc_info is not None and record.name == _AIOHTTP_SERVER:
            error = exc_info[1]
            if isinstance(error, HttpProcessingError | RequestPayloadError) and (
                not isinstance(error, HttpProcessingError) or error.code < 500
            ):
                # A request aiohttp could not parse: the client's mistake, not our stack.
                # Its message quotes what the client sent: on one line, cut short.
                cause = error.__cause__ if isinstance(error, RequestPayloadError) else error
                reason = " ".join(str(getattr(cause, "message", cause)).split())
                client_errors.warn(
                    type(error).__name__,
                    "{}: {}: {}",
                    record.getMessage(),
                    type(error).__name__,
                    reason[:_CLIENT_TEXT_MAX],
                    context=record.name,
                )
                return
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


def setup_logging(settings: LoggingSection, *, program: str, stream: IO[str] | None = None) -> Logs:
    """Replace loguru's sinks with this process's outputs; ``stream`` defaults to stdout."""
    redactor = Redactor(settings.log_redact_fields, secrets=configured_secrets(settings))
    client_errors.reset()
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
        # Never variable values in a traceback, whatever the environment: they hold tokens.
        diagnose=False,
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
