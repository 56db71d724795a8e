"""Shared start-up code for the benchmark peers: port from argv/env, fd limit, uvloop."""

import os
import resource
import sys

import uvloop
from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ("listen_port", "raise_fd_limit", "serve_bare", "serve_route")


def listen_port(default: int = 3001) -> int:
    """The port from the first argument, else ``PORT``, else ``default``."""
    if len(sys.argv) > 1:
        return int(sys.argv[1])
    return int(os.environ.get("PORT", default))


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


async def _startup(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def serve_bare(app: web.Application) -> None:
    """Serve a bare peer with uvloop, its readiness answered at ``/health/startup``."""
    raise_fd_limit()
    uvloop.install()
    app.router.add_get("/health/startup", _startup)
    web.run_app(app, host="127.0.0.1", port=listen_port(), access_log=None, print=None)


def serve_route(method: str, path: str, handler: Handler) -> None:
    """Serve a bare peer answering one route."""
    app = web.Application()
    app.router.add_route(method, path, handler)
    serve_bare(app)
