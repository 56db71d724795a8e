"""Typed key of the worker's own state; the shared keys are in ``shared/appkeys.py``."""

from aiohttp import web

from .state import WorkerState

__all__ = ("WORKER",)

WORKER = web.AppKey("worker", WorkerState)
