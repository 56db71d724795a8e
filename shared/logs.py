"""Process-wide logging: JSON lines on stdout with the fields log aggregation expects."""

import sys
from typing import TYPE_CHECKING

import msgspec
from loguru import logger

from .settings import Settings
from .version import build_version

if TYPE_CHECKING:
    from loguru import Message

__all__ = ("setup_logging",)


def setup_logging(settings: Settings, *, program: str) -> None:
    static = {
        "service": program,
        "version": build_version(),
        "environment": settings.environment,
        "pod": settings.pod,
    }
    encoder = msgspec.json.Encoder()

    def sink(message: "Message") -> None:
        record = message.record
        line: dict[str, object] = {
            "timestamp": record["time"].isoformat(timespec="milliseconds"),
            "level": record["level"].name.lower(),
            "message": record["message"],
            "context": record["name"],
            **static,
            **record["extra"],
        }
        if record["exception"] is not None:
            line["exception"] = message.rstrip().split("\n", 1)[-1]
        sys.stdout.write(encoder.encode(line).decode() + "\n")

    logger.remove()
    logger.add(sink, level=settings.log_level.upper(), backtrace=False, diagnose=False)
