"""Daily log files in UTC: ``application-YYYY-MM-DD.log`` and its error, exception and rejection
siblings, pruned after ``retention_days`` and optionally compressed once their day is over.

The day of a line is the UTC day of its record's timestamp, so a file holds exactly that day's
lines and rotation happens with the first line after midnight (the clock tests drive is the
records' time). Loguru's own file sink is not used: it rotates on local time, and a ``{time}``
in its path combined with ``rotation="00:00"`` is known to misbehave (Delgan/loguru#697); it
would also format every line once per file.

Each line is one ``write(2)`` on an ``O_APPEND`` descriptor, so nothing waits in a buffer
when the process dies. Pruning and compression run in a background thread: compressing a
day of logs must not stall the event loop at midnight.
"""

import bz2
import contextlib
import datetime as dt
import gzip
import io
import lzma
import os
import re
import shutil
import sys
import threading
from pathlib import Path

from loguru import logger

__all__ = ("KINDS", "DailyFiles", "file_name")

KINDS = ("application", "error", "exceptions", "rejections")
SECONDS_PER_DAY = 86_400

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_NAME = re.compile(
    r"(?P<kind>application|error|exceptions|rejections)-(?P<date>\d{4}-\d{2}-\d{2})\.log"
    r"(?P<compressed>\.(?:gz|bz2|xz))?(?P<partial>\.[0-9]+\.tmp)?"
)
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def file_name(kind: str, day: int) -> str:
    """The file of ``kind`` for ``day`` (days since 1970-01-01, UTC)."""
    return f"{kind}-{dt.date.fromordinal(day + _EPOCH_ORDINAL).isoformat()}.log"


def _compressed_writer(path: Path, method: str) -> io.BufferedIOBase:
    if method == "gz":
        return gzip.GzipFile(path, "wb")
    if method == "bz2":
        return bz2.BZ2File(path, "wb")
    return lzma.LZMAFile(path, "wb")


class DailyFiles:
    """The open files of the current day; not thread-safe (loguru serialises its sink calls)."""

    def __init__(self, directory: str | Path, *, retention_days: int, compression: str) -> None:
        self.directory = Path(directory)
        # If it cannot be made, the first write says so once; the process runs on.
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
        self._retention_days = retention_days
        self._compression = None if compression == "none" else compression
        self._day = -1
        self._fds: dict[str, int] = {}
        self._maintenance: threading.Thread | None = None
        self._failing = False

    def write(self, day: int, data: bytes, kinds: tuple[str, ...]) -> None:
        """Append ``data`` (one or more whole lines) to the day's file of each kind."""
        try:
            if day != self._day:
                self._roll(day)
            fds = self._fds
            for kind in kinds:
                fd = fds.get(kind)
                if fd is None:
                    fd = fds[kind] = os.open(self.directory / file_name(kind, day), _FLAGS, 0o644)
                os.write(fd, data)
        except OSError as e:
            # A full or read-only disk must not take the process down nor flood stderr:
            # one line when it starts failing, and the other sinks still get the record.
            if not self._failing:
                print(f"log files in {self.directory} failing: {e}", file=sys.stderr, flush=True)
            self._failing = True
        else:
            self._failing = False

    def close(self, *, timeout: float = 5.0) -> None:
        self._close_files()
        self._day = -1
        if self._maintenance is not None:
            self._maintenance.join(timeout)

    def _roll(self, day: int) -> None:
        self._close_files()
        self._day = day
        previous = self._maintenance
        self._maintenance = threading.Thread(
            target=self._maintain, args=(day, previous), name="log-maintenance", daemon=True
        )
        self._maintenance.start()

    def _close_files(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _maintain(self, today: int, previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()
        try:
            entries = list(os.scandir(self.directory))
        except OSError as e:
            logger.warning("log maintenance: cannot list {}: {}", self.directory, e)
            return
        oldest_kept = today - self._retention_days + 1
        for entry in entries:
            match = _NAME.fullmatch(entry.name)
            if match is None:
                continue
            day = dt.date.fromisoformat(match["date"]).toordinal() - _EPOCH_ORDINAL
            path = Path(entry.path)
            try:
                # Another process sharing the directory may be compressing yesterday.
                if day < oldest_kept or (match["partial"] and day < today - 1):
                    path.unlink(missing_ok=True)
                elif (
                    day < today
                    and self._compression is not None
                    and not match["compressed"]
                    and not match["partial"]
                ):
                    self._compress(path, self._compression)
            except OSError as e:
                logger.warning("log maintenance: {} left as it is: {}", path.name, e)

    @staticmethod
    def _compress(path: Path, method: str) -> None:
        target = path.with_name(f"{path.name}.{method}")
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with path.open("rb") as source, _compressed_writer(partial, method) as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        os.replace(partial, target)
        path.unlink()
