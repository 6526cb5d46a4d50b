"""``GET /v1/jobs/{id}/events``: a job's status changes, progress and new metrics as
Server-Sent Events, until the job is terminal.

The streams of a process share one probe of their jobs (every :data:`POLL_S`,
:class:`~metaserve.api.job_watch.JobWatch`); a stream reads its job's events when its job moved,
built from durable data only — the job's status history (one row per change), its progress snapshot, the metric rows by
id — so an event id is a cursor into that data (``"<status event id>-<metric id>-<iteration>"``,
see :func:`metaserve.service.events.poll_job_events` for exactly what is an event). A client that
reconnects with ``Last-Event-ID`` (browsers' EventSource do it by themselves) gets every
event after that one, none twice. The stream closes after the terminal status event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from metaserve.api.deps import CurrentUser, PathText, SessionDep
from metaserve.api.job_watch import JobWatch
from metaserve.api.schemas import ErrorResponse
from metaserve.service import auth, events, job_store
from metaserve.service.exceptions import TooManyStreams
from metaserve.service.orm import User

POLL_S = 0.25
KEEPALIVE_S = 15.0
DISCONNECT_CHECK_S = 1.0
"""How often a quiet stream wakes to see whether its key check is due (no database work).
Its client leaving needs no look: the response listens for the disconnect and cancels the
stream at once (Starlette's ``StreamingResponse`` under uvicorn; 300 streams polling
``is_disconnected()`` each second cost the event loop 300 cancel scopes a second)."""
RETRY_MS = 1000
EVENT_ID_PATTERN = r"^ *[0-9]{1,18}-[0-9]{1,18}-[0-9]{1,18} *$"
"""What an event id looks like, for the schema (the route checks it: 422 naming the header)."""

router = APIRouter(prefix="/v1/jobs", tags=["events"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job of yours"},
    422: {"model": ErrorResponse, "description": "An invalid Last-Event-ID"},
    429: {"model": ErrorResponse, "description": "Too many open event streams of this user "
                                                "(METASERVE_MAX_EVENT_STREAMS_PER_USER)"},
})

STREAM_RETRY_AFTER_S = 5


class StreamSlots:
    """Open SSE streams per user on this process, at most ``limit`` each: a stream holds a
    connection and a place in the job watch for as long as its client keeps it open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[int, int] = {}

    def acquire(self, user_id: int) -> bool:
        # Only touched on the event loop: no lock needed.
        if self._open.get(user_id, 0) >= self.limit:
            return False
        self._open[user_id] = self._open.get(user_id, 0) + 1
        return True

    def release(self, user_id: int) -> None:
        left = self._open.get(user_id, 0) - 1
        if left > 0:
            self._open[user_id] = left
        else:
            self._open.pop(user_id, None)

    def open_streams(self, user_id: int) -> int:
        return self._open.get(user_id, 0)


def stream_slots(request: Request) -> StreamSlots:
    slots = getattr(request.app.state, "event_stream_slots", None)
    if slots is None:
        slots = request.app.state.event_stream_slots = StreamSlots(
            request.app.state.settings.max_event_streams_per_user)
    return slots


def open_stream(request: Request, user: User, body: AsyncIterator[str]) -> StreamingResponse:
    """The SSE response of ``body`` (a job's events or its log lines) in one of ``user``'s
    stream slots: 429 when they are all taken. The slot is the stream's from here, released
    when ``body`` ends or its client goes away; a client is told to reconnect after RETRY_MS."""
    slots = stream_slots(request)
    if not slots.acquire(user.id):
        raise TooManyStreams(f"{slots.limit} event streams of yours are open on this server; "
                             "close one or retry later", open_streams=slots.limit,
                             retry_after_s=STREAM_RETRY_AFTER_S)

    async def stream() -> AsyncIterator[str]:
        try:
            yield f"retry: {RETRY_MS}\n\n"
            async for chunk in body:
                yield chunk
        finally:
            await body.aclose()
            slots.release(user.id)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class KeyChecks:
    """The database's word on the API keys of this process's open streams, shared: a stream
    whose check is due takes the answer of a check of its key that started at most
    ``fresh_s`` ago (or joins one running), so a user's 20 streams cost about two queries per
    check period instead of twenty thread hops and queries (300 streams checking every 2 s
    were 150 a second, each holding the GIL in a threadpool thread while the event loop
    waited: docs/notes/hostile-load-tail.md). Touched only from the event loop."""

    def __init__(self, session_factory, fresh_s: float) -> None:  # noqa: ANN001
        self.session_factory = session_factory
        self.fresh_s = fresh_s
        self._checks: dict[tuple[str, int], tuple[float, asyncio.Future]] = {}
        self.queries = 0  # how many checks reached the database (tests, curious operators)

    async def ended(self, key_hash: str, user_id: int) -> str | None:
        """Why the key no longer authenticates the user (``auth.KEY_REVOKED`` /
        ``KEY_ROTATED``), or None, as read by a check started within ``fresh_s``."""
        key = (key_hash, user_id)
        now = time.monotonic()
        found = self._checks.get(key)
        if found is None or now - found[0] > self.fresh_s:
            if len(self._checks) > MAX_KEY_CHECKS:
                self._forget(now)
            self.queries += 1
            found = self._checks[key] = (now, asyncio.ensure_future(
                run_in_threadpool(self._ended, key_hash, user_id)))
        return await asyncio.shield(found[1])

    def _ended(self, key_hash: str, user_id: int) -> str | None:
        with self.session_factory() as session:
            return auth.key_ended(session=session, key_hash=key_hash, user_id=user_id)

    def _forget(self, now: float) -> None:
        for key in [key for key, (started, future) in self._checks.items()
                    if future.done() and now - started > self.fresh_s]:
            del self._checks[key]


MAX_KEY_CHECKS = 10_000
"""Keys remembered by :class:`KeyChecks` before the stale ones are dropped."""


def key_checks(request: Request) -> KeyChecks:
    checks = getattr(request.app.state, "stream_key_checks", None)
    if checks is None:
        checks = request.app.state.stream_key_checks = KeyChecks(
            request.app.state.session_factory,
            request.app.state.settings.stream_key_check_s / 2)
    return checks


class StreamKeyCheck:
    """An open stream's look at its API key in the database (not the key cache) every
    ``stream_key_check_s``: a key revoked or rotated out, by this server or any other process,
    ends the stream within that time with a last ``closed`` event saying why (a stream may
    otherwise stay open for the job's whole runtime, days). The answer is shared
    (:class:`KeyChecks`) and may be up to half the period old, so a stream asks twice as
    often: no answer it acts on was read longer than ``stream_key_check_s`` before."""

    def __init__(self, request: Request, user: User) -> None:
        self.checks = key_checks(request)
        self.key_cache = request.app.state.key_cache
        self.every_s = request.app.state.settings.stream_key_check_s - self.checks.fresh_s
        self.key_hash = request.state.key_hash
        self.user_id = user.id
        self.checked_at = time.monotonic()

    async def closing_event(self) -> str | None:
        """The stream's last event if its key ended (checked when one is due), else None."""
        if time.monotonic() - self.checked_at < self.every_s:
            return None
        self.checked_at = time.monotonic()
        reason = await self.checks.ended(self.key_hash, self.user_id)
        if reason is None:
            return None
        self.key_cache.forget_user(self.user_id)  # new requests with it are refused here too
        message = {auth.KEY_REVOKED: "the API key of this stream was revoked",
                   auth.KEY_ROTATED: "the API key of this stream was replaced by a new one"}
        return (f"event: closed\ndata: "
                f"{json.dumps({'reason': reason, 'message': message[reason]})}\n\n")


def format_event(event: events.JobEvent) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n"


def job_watch(request: Request) -> JobWatch:
    watch = getattr(request.app.state, "job_watch", None)
    if watch is None:
        watch = request.app.state.job_watch = JobWatch(request.app.state.session_factory, POLL_S)
    return watch


async def _stream(request: Request, job_id: str, user: User,
                  cursor: events.EventCursor) -> AsyncIterator[str]:
    factory = request.app.state.session_factory

    def poll(after: events.EventCursor) -> tuple[list[events.JobEvent], bool]:
        with factory() as session:
            return events.poll_job_events(session=session, job_id=job_id, owner=user, after=after)

    watch = job_watch(request)
    key_check = StreamKeyCheck(request, user)
    version = watch.watch(job_id)
    try:
        async for chunk in _event_loop(request, watch, job_id, version, poll, cursor,
                                       key_check):
            yield chunk
    finally:
        watch.unwatch(job_id)


async def _event_loop(request: Request, watch: JobWatch, job_id: str, version: int,
                      poll, cursor: events.EventCursor,  # noqa: ANN001
                      key_check: StreamKeyCheck) -> AsyncIterator[str]:
    last_sent = time.monotonic()
    events_, complete = await run_in_threadpool(poll, cursor)  # all there is, at once
    while True:
        if (closing := await key_check.closing_event()) is not None:
            yield closing
            return
        for event in events_:
            yield format_event(event)
            cursor = event.id
        if complete:
            return
        if events_:  # a read is bounded (MAX_METRIC_ROWS_PER_POLL): read on until one is empty
            last_sent = time.monotonic()
            events_, complete = await watch.read(job_id, version, cursor, poll)
            continue
        while True:  # until the job moves: no database work, a look at the key when due
            seen, version = version, await watch.wait_for_change(job_id, version,
                                                                 DISCONNECT_CHECK_S)
            if (closing := await key_check.closing_event()) is not None:
                yield closing
                return
            if version > seen:
                break
            if time.monotonic() - last_sent > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
        events_, complete = await watch.read(job_id, version, cursor, poll)


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "`text/event-stream`: events `status`, `metrics` (one per step: "
                         "`{step, values}`) and `progress` (iteration, total, tasks_per_s, "
                         "eta_s, workers); each `id` is a resume cursor. A stream whose API "
                         "key is revoked or rotated out ends within METASERVE_STREAM_KEY_CHECK_S "
                         "with a `closed` event `{reason: api_key_revoked | api_key_rotated, "
                         "message}`.",
          "content": {"text/event-stream": {}}},
})
async def job_events(
    job_id: PathText,
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    # Typed ``str`` (absent: None) so the schema does not offer ``null``, which a header or
    # query string cannot carry: a client sending the text "null" is told 422.
    last_event_id: Annotated[str, Header(
        max_length=100, json_schema_extra={"pattern": EVENT_ID_PATTERN})] = None,
    after: Annotated[str, Query(
        max_length=100, json_schema_extra={"pattern": EVENT_ID_PATTERN},
        description="Like Last-Event-ID, for clients that cannot set headers.")] = None,
) -> StreamingResponse:
    """Server-Sent Events of the job until it is terminal; resumes after `Last-Event-ID`."""
    cursor = events.EventCursor.parse(last_event_id or after)
    await run_in_threadpool(_check_job, session, job_id, user)  # 404 before the stream starts
    # ``user`` is the key cache's transient copy: safe to use after this request's session
    return open_stream(request, user, _stream(request, job_id, user, cursor))


def _check_job(session, job_id: str, user: User) -> None:  # noqa: ANN001
    with session.begin():  # ended here: the stream polls with sessions of its own
        job_store.get_job_row(session=session, job_id=job_id, owner=user)
