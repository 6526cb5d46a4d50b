"""``GET /metrics``: Prometheus metrics for operators (:mod:`metaserve.service.telemetry`), for
an admin key, or for anyone when ``METASERVE_METRICS_ANONYMOUS=true``; and the middleware that
counts and times every request by its route template."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metaserve.api.deps import get_current_user
from metaserve.api.schemas import ErrorResponse
from metaserve.service.exceptions import AdminOnly
from metaserve.service.telemetry import CONTENT_TYPE, RECEIVED_AT, Telemetry

router = APIRouter(tags=["operators"])

UNMATCHED = "<unmatched>"
"""The route label of a request no route matched (a 404 for any path: never the raw path,
which would make one series per path a client invents)."""

DISPATCHER_HEALTH_MAX_AGE_S = 30.0


class MetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status, and runs the
    event-loop lag probe for the application's lifetime.

    A request's time starts when the server read the first bytes of its head (``metaserve
    serve`` stamps it: :data:`~metaserve.service.telemetry.RECEIVED_AT`; else when the
    application is called) and ends when the last byte of its response is handed to the
    socket: the request's body, the queue for the event loop and the threadpool, the handler,
    and the response body, streamed or not. An event stream (``text/event-stream``) is timed
    to its response head: its length is the job's, not a latency."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            probe = asyncio.create_task(self.telemetry.loop_lag.probe())
            try:
                await self.app(scope, receive, send)
            finally:
                probe.cancel()
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = (scope.get("extensions") or {}).get(RECEIVED_AT) or time.perf_counter()
        status = 500
        observed = False

        def observe() -> None:
            nonlocal observed
            if not observed:
                observed = True
                self.telemetry.http.observe(scope["method"], route_template(scope), status,
                                            time.perf_counter() - started)

        async def timed_send(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                if _is_event_stream(message.get("headers") or ()):
                    observe()
            await send(message)
            if kind == "http.response.body" and not message.get("more_body", False):
                observe()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            observe()  # an exception (500), or a response cut short: timed until here


def _is_event_stream(headers) -> bool:  # noqa: ANN001
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
               for name, value in headers)


def route_template(scope: Scope) -> str:
    """The template of the route that answered (``/v1/jobs/{job_id}``); for an answer given
    before routing (a middleware's 413 or 422), the API path template the path matches;
    ``<unmatched>`` when none does (never the raw path)."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template:
        return template
    path = scope.get("path", "")
    for pattern, candidate in _path_templates(scope.get("app")):
        if pattern.match(path):
            return candidate
    return UNMATCHED


def _path_templates(app) -> list[tuple[re.Pattern, str]]:  # noqa: ANN001
    """The OpenAPI document's path templates, compiled once per application (templates
    without a parameter first, so ``/v1/jobs/events`` would not be taken for a job id)."""
    state = getattr(app, "state", None)
    found = getattr(state, "metrics_path_templates", None)
    if found is None:
        templates = sorted(app.openapi().get("paths", {}), key=lambda t: ("{" in t, t)) \
            if app is not None else []
        found = [(compile_path(template)[0], template) for template in templates]
        if state is not None:
            state.metrics_path_templates = found
    return found


def dispatcher_connected(app: FastAPI) -> bool:
    """This server's dispatcher is connected to Ray, or a standalone one reported recently."""
    dispatcher = getattr(app.state, "dispatcher", None)
    if dispatcher is not None:
        return dispatcher.ray_ready.is_set()
    path: Path = app.state.settings.dispatcher_health_path
    try:  # as service.dispatcher.dispatcher_healthy reads it, without importing Ray here
        reported = float(json.loads(path.read_text()).get("time", 0))
    except (OSError, ValueError, AttributeError):
        return False
    return time.time() - reported <= DISPATCHER_HEALTH_MAX_AGE_S


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition format.",
          "content": {"text/plain": {}}},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    403: {"model": ErrorResponse, "description": "Not an admin key (and anonymous scrapes "
                                                "are off: METASERVE_METRICS_ANONYMOUS)"},
})
async def metrics(request: Request) -> Response:
    """Request counts and latency by route, jobs by status, queue depth and age, leases,
    running jobs' tasks/s, dispatcher connected."""
    if not request.app.state.settings.metrics_anonymous:
        from fastapi.security import HTTPBearer

        credentials = await HTTPBearer(auto_error=False)(request)
        user = await get_current_user(request, credentials)
        if not user.is_admin:
            raise AdminOnly()
    telemetry: Telemetry = request.app.state.telemetry
    body = await run_in_threadpool(telemetry.exposition)
    return Response(body, media_type=CONTENT_TYPE)
