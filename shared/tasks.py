"""Stopping background tasks for sure."""

import asyncio
from collections.abc import Collection
from typing import Any

from loguru import logger

__all__ = ("cancel_and_wait",)


async def cancel_and_wait(tasks: Collection[asyncio.Task[Any]], *, grace: float = 5.0) -> None:
    """Cancel the tasks and wait until they have stopped.

    A cancellation can be lost when it lands while a library converts it into its own
    error, so stragglers are cancelled again until they stop or the grace period ends.
    """
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            logger.error("tasks did not stop: {}", sorted(t.get_name() for t in pending))
            return
        _, pending = await asyncio.wait(pending, timeout=min(remaining, 0.1))
        if pending:
            logger.debug("re-cancelling {}", sorted(t.get_name() for t in pending))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("task {} had failed", task.get_name())
