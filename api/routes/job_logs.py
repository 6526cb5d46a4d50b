"""``GET /v1/jobs/{id}/logs``: a job's log (its driver's and inner-loop workers' records,
tracebacks included, and the dispatcher's lines about its attempts), owner-scoped; with
``follow=true`` as Server-Sent Events until the job has ended and its log is read."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from metaserve.api.deps import CurrentUser, PathText
from metaserve.api.routes.events import KEEPALIVE_S, POLL_S, StreamKeyCheck, open_stream
from metaserve.api.schemas import ErrorResponse
from metaserve.service.job_logs import MAX_LOG_PAGE, LogPage, read_logs
from metaserve.service.orm import User

router = APIRouter(prefix="/v1/jobs", tags=["logs"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job of yours"},
    422: {"model": ErrorResponse, "description": "A query parameter or header out of range, named"},
    429: {"model": ErrorResponse, "description": "Too many open event streams of this user "
                                                "(follow=true)"},
})


class LogLinePublic(BaseModel):
    seq: int
    time: str
    attempt: int
    level: str
    source: str
    message: str


class LogsPublic(BaseModel):
    data: list[LogLinePublic]
    next_after: int
    dropped: int
    status: str
    complete: bool


def format_line(line: dict) -> str:
    return f"id: {line['seq']}\nevent: log\ndata: {json.dumps(line)}\n\n"


async def _follow(request: Request, job_id: str, user: User, after: int) -> AsyncIterator[str]:
    factory = request.app.state.session_factory

    def poll(cursor: int) -> LogPage:
        with factory() as session:
            return read_logs(session=session, job_id=job_id, owner=user, after=cursor,
                             limit=MAX_LOG_PAGE)

    key_check = StreamKeyCheck(request, user)
    last_sent = time.monotonic()
    while True:
        if (closing := await key_check.closing_event()) is not None:
            yield closing
            return
        page = await run_in_threadpool(poll, after)
        for line in page.lines:
            yield format_line(line)
        after = page.next_after
        if page.ended:
            yield f"event: end\ndata: {json.dumps({'status': page.status})}\n\n"
            return
        if page.lines:
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if await request.is_disconnected():
            return
        if page.complete:
            await anyio.sleep(POLL_S * 2)


@router.get("/{job_id}/logs", response_model=LogsPublic, responses={
    200: {"description": "The log records after `after` (JSON), or with `follow=true` a "
                         "`text/event-stream` of `log` events (id: the record's seq) ending "
                         "with an `end` event once the job has ended, or a `closed` event "
                         "`{reason, message}` once its API key is revoked or rotated out.",
          "content": {"text/event-stream": {}}},
})
async def job_logs(
    job_id: PathText,
    request: Request,
    user: CurrentUser,
    after: Annotated[int, Query(ge=0, le=2**62, description="Only records after this seq.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LOG_PAGE,
                                description="Records per page.")] = 1000,
    follow: Annotated[bool, Query(description="Stream new records (SSE) until the job ends.")] = False,
    last_event_id: Annotated[str, Header(max_length=20, pattern=r"^ *[0-9]{1,18} *$")] = None,
):
    """The job's log records in order: each is a line or a message with its traceback."""
    factory = request.app.state.session_factory

    def read(cursor: int, count: int) -> LogPage:
        with factory() as session:
            return read_logs(session=session, job_id=job_id, owner=user, after=cursor,
                             limit=count)

    if last_event_id:
        after = max(after, int(last_event_id))
    if not follow:
        page = await run_in_threadpool(read, after, limit)
        return LogsPublic(data=page.lines, next_after=page.next_after, dropped=page.dropped,
                          status=page.status, complete=page.complete)
    await run_in_threadpool(read, after, 1)  # 404 before the stream starts
    return open_stream(request, user, _follow(request, job_id, user, after))
