"""What both ingest routes do the same way: refuse an unauthenticated client, refuse a
batch while ingestion is paused, and name the span of a sampled batch's write."""

from aiohttp import web

from shared.errors import error_response

from ..ratelimit import check_client
from ..state import IngestState

__all__ = (
    "BACKLOG_EXCEEDED",
    "SHUTTING_DOWN",
    "WRITE_SPAN",
    "WRITE_SPAN_ATTRIBUTES",
    "ingestion_paused",
    "refuse_unauthenticated",
)

BACKLOG_EXCEEDED = "ingestion is paused: the readings backlog is over its limit"
SHUTTING_DOWN = "the service is shutting down"

# The span of a sampled batch's write, HTTP or WebSocket: the stored entry names it as its
# parent, so the worker's span of the entry joins the trace.
WRITE_SPAN = "EVALSHA readings"
WRITE_SPAN_ATTRIBUTES = {
    "db.system": "redis",
    "db.operation": "EVALSHA",
    "messaging.system": "redis",
    "messaging.operation": "publish",
    "messaging.destination.name": "readings",
}


async def refuse_unauthenticated(
    state: IngestState, request: web.Request, route: str
) -> web.Response:
    """401, or the per-IP gate's refusal once the client's IP has used up its API budget:
    guessing tokens is throttled."""
    if state.api_policy is not None:
        gate = await check_client(
            state, request, route, state.api_policy, refusal="too many requests from this address"
        )
        if isinstance(gate, web.Response):
            return gate
    return error_response(
        401, "a valid device token is required", headers={"WWW-Authenticate": "Bearer"}
    )


def ingestion_paused(state: IngestState) -> str | None:
    """Why no batch can be taken right now, if so."""
    if state.backlog.exceeded:
        return BACKLOG_EXCEEDED
    if state.draining:
        return SHUTTING_DOWN
    return None
