"""Typed keys of the worker's own state and settings; the shared ones: ``shared/appkeys.py``."""

from typing import cast

from aiohttp import web

from shared import appkeys
from shared.settings import WorkerSettings

from .state import WorkerState

__all__ = ("SETTINGS", "WORKER")

# The shared key, under which the worker stores its WorkerSettings: the shared resources
# read it as the sections they need, the worker's own code as the whole class.
SETTINGS = cast("web.AppKey[WorkerSettings]", appkeys.SETTINGS)

WORKER = web.AppKey("worker", WorkerState)
