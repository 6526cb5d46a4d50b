"""``GET /metrics``: Prometheus metrics for operators (:mod:`metaserve.service.telemetry`), for
an admin key, or for anyone when ``METASERVE_METRICS_ANONYMOUS=true``; and the middleware that
counts and times every request by its route template."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metaserve.api.deps import get_current_user
from metaserve.api.schemas import ErrorResponse
from metaserve.service.exceptions import MetaserveError
from metaserve.service.telemetry import CONTENT_TYPE, Telemetry

router = APIRouter(tags=["operators"])

UNMATCHED = "<unmatched>"
"""The route label of a request no route matched (a 404 for any path: never the raw path,
which would make one series per path a client invents)."""

DISPATCHER_HEALTH_MAX_AGE_S = 30.0


class AdminOnly(MetaserveError):
    """This needs an admin API key."""

    status_code = 403
    code = "forbidden"


class MetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status. The time is
    until the response head is sent (for an event stream, until it starts)."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if observed:
                return
            observed = True
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            self.telemetry.http.observe(scope["method"], template, status,
                                        time.perf_counter() - started)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            observe(500)
            raise


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
