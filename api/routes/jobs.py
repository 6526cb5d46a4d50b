from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from metaserve.api.deps import NO_CONTROL_CHARACTERS, CurrentUser, PathText, SessionDep
from metaserve.api.routes.events import KEEPALIVE_S, StreamKeyCheck, open_stream
from metaserve.api.routes.health import store_health
from metaserve.api.schemas import (ErrorResponse, JobPublic, JobsPublic, StatusEventPublic,
                                   model_response)
from metaserve.service import datasets, job_listing, job_store, jobs, limits
from metaserve.service.exceptions import InvalidListQuery
from metaserve.service.orm import JobStatus
from metaserve.service.job_listing import MAX_PAGE
from metaserve.workers.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    422: {"model": ErrorResponse, "description": "Invalid request, or a job above the server's "
          "cost limits (code limit_exceeded); each field is named with the estimate and the cap"},
})


# The hot routes (submit, poll, list, cancel) build their response model once and return it
# serialized (``model_response``); ``response_model`` keeps the OpenAPI schema. FastAPI would
# otherwise validate the returned model a second time.


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic, responses={
    200: {"model": JobPublic, "description": "Replay of an Idempotency-Key: the existing job"},
    409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body"},
    413: {"model": ErrorResponse, "description": "Body above MAX_BODY_BYTES"},
    429: {"model": ErrorResponse, "description": "MAX_QUEUED_JOBS_PER_USER reached; the error "
          "names the limit, your count and the cap; see Retry-After"},
})
def create_job(
    spec: JobSpec,
    user: CurrentUser,
    session: SessionDep,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=200,
                                                   pattern=NO_CONTROL_CHARACTERS)] = None,
) -> Response:
    """Validate and queue a meta-training job."""
    settings = request.app.state.settings  # not SettingsDep: a sync dependency costs a thread hop
    # The data first: a tabular spec's features are resolved against its table, and the cost
    # model needs them (the input width).
    spec = datasets.check_job_data(session=session, owner=user, spec=spec, settings=settings)
    limits.check_job_cost(spec=spec, settings=settings)
    job, created = jobs.submit_job(session=session, owner=user, spec=spec,
                                   idempotency_key=idempotency_key,
                                   max_queued=settings.max_queued_jobs_per_user,
                                   retry_after_s=settings.quota_retry_after_s)
    return model_response(JobPublic.model_validate(job),
                          status.HTTP_201_CREATED if created else status.HTTP_200_OK,
                          headers={"Location": f"/v1/jobs/{job.id}"})


def _waiting(request: Request) -> Callable[[], str]:
    """The reason a queued job without a stored one waits, computed once per response."""
    reason: list[str] = []

    def compute() -> str:
        if not reason:
            dispatcher = getattr(request.app.state, "dispatcher", None)
            settings = request.app.state.settings
            reason.append(jobs.waiting_reason(
                embedded=dispatcher is not None,
                running=len(dispatcher.running_jobs()) if dispatcher is not None else 0,
                concurrency=settings.dispatcher_concurrency,
                ray_ready=dispatcher is None or dispatcher.ray_ready.is_set(),
                store_error=store_health(request).error()))
        return reason[0]
    return compute


def job_public(job: Any, waiting: Callable[[], str], **extra: Any) -> JobPublic:
    """The job's public form; a queued job without a stored message says what it waits for."""
    public = JobPublic.model_validate(job)
    if public.status is JobStatus.QUEUED and not public.message:
        extra["message"] = waiting()
    return public.model_copy(update=extra) if extra else public


def _invalid_query(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", field), "msg": message,
                                    "type": "value_error"}])


@router.get("", response_model=JobsPublic, responses={
    400: {"model": ErrorResponse, "description": "A cursor that no page of this list returned "
                                                 "(or one of another sort or order)"},
})
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    request: Request,
    sort: Annotated[str, Query(max_length=300, pattern=NO_CONTROL_CHARACTERS, description=(
        "`created_at` (default), `name`, `status`, `updated_at`, `duration` (finished jobs; "
        "others last), `metric:<name>` (the job's latest value of that metric), or "
        "`param:<dotted.spec.path>` (e.g. `param:algorithm.inner_lr`). Jobs without a value "
        "come last in either order."))] = "created_at",
    order: Annotated[Literal["asc", "desc"], Query(description="Default desc.")] = "desc",
    status_filter: Annotated[list[str] | None, Query(
        alias="status", max_length=20, description="Repeat it or give a comma list: "
        "`status=queued,running`.")] = None,
    algorithm: Annotated[str | None, Query(min_length=1, max_length=100,
                                           pattern=NO_CONTROL_CHARACTERS)] = None,
    family: Annotated[str | None, Query(min_length=1, max_length=100,
                                        pattern=NO_CONTROL_CHARACTERS,
                                        description="The task family's name.")] = None,
    sweep_id: Annotated[str | None, Query(max_length=100, pattern=NO_CONTROL_CHARACTERS,
                                          description="A sweep's id: its trials only.")] = None,
    sweep: Annotated[str | None, Query(max_length=100, pattern=NO_CONTROL_CHARACTERS,
                                       deprecated=True, description="Old name of `sweep_id` "
                                       "(which wins when both are given).")
                     ] = None,
    trials: Annotated[Literal["fold", "show", "only"] | None, Query(description=(
        "`fold` (default): a sweep's trials are hidden, its driver job stands for them with "
        "`trial_count`; `show`: listed too; `only`: trials alone. With `sweep_id` the default "
        "is `show`."))] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=200,
                                      pattern=NO_CONTROL_CHARACTERS,
                                      description="Only jobs whose name contains this, in any "
                                      "case (`%` and `_` match themselves).")] = None,
    cursor: Annotated[str | None, Query(max_length=2000, pattern=NO_CONTROL_CHARACTERS)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Your jobs (an admin sees everyone's), sorted, filtered and paged: `total` counts every
    match, `next_cursor` continues under the same query."""
    try:
        statuses = job_listing.parse_statuses(status_filter)
        with session.begin():
            listing = job_listing.list_jobs(
                session=session, owner=user, sort=sort, order=order, statuses=statuses,
                algorithm=algorithm, family=family, sweep_id=sweep_id or sweep, name=name,
                trials=trials, cursor=cursor, limit=limit)
    except InvalidListQuery as exc:
        raise _invalid_query(exc.field, exc.message) from None
    waiting = _waiting(request)
    data = []
    for job in listing.jobs:
        driven = listing.driven_sweeps.get(job.id)
        extra: dict[str, Any] = {"latest_metrics": listing.latest_metrics.get(job.id, {})}
        if driven is not None:
            extra["driver_of_sweep"], extra["trial_count"] = driven
        data.append(job_public(job, waiting, **extra))
    return model_response(JobsPublic(data=data, total=listing.total,
                                     next_cursor=listing.next_cursor))


LIST_POLL_S = 1.0
"""How often a list stream looks for changed jobs (one indexed query per stream)."""


def _list_event_id(job: Any) -> str:
    return f"{job.updated_at.isoformat()}~{job.id}"


def _parse_list_event_id(value: str) -> tuple[datetime, str]:
    at, _, job_id = value.strip().partition("~")
    try:
        parsed = datetime.fromisoformat(at)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or len(job_id) != 26 or not job_id.isalnum():
        raise RequestValidationError([{"loc": ("header", "last-event-id"), "type": "value_error",
                                       "msg": "not an event id of this stream"}])
    return parsed, job_id


async def _list_changes(request: Request, user: Any, trials: str,
                        after: tuple[datetime, str] | None) -> AsyncIterator[str]:
    factory = request.app.state.session_factory
    waiting = _waiting(request)
    opened = datetime.now(timezone.utc)
    seen: dict[str, str] = {}  # job id -> the status this stream last sent

    def poll(after: tuple[datetime, str] | None) -> list[tuple[str, JobPublic, str]]:
        with factory() as session, session.begin():
            if after is None:  # a new stream: from now on
                return [("start", None, _list_event_id(job)) for job in
                        job_listing.changed_jobs(session=session, owner=user, after=None,
                                                 trials=trials, newest=1)]
            changed = job_listing.changed_jobs(session=session, owner=user, after=after,
                                               trials=trials)
            ids = [job.id for job in changed]
            latest = job_listing.latest_metrics(session=session, job_ids=ids)
            driven = job_listing.driven_sweeps(session=session, job_ids=ids)
        found = []
        for job in changed:
            extra: dict[str, Any] = {"latest_metrics": latest.get(job.id, {})}
            if job.id in driven:
                extra["driver_of_sweep"], extra["trial_count"] = driven[job.id]
            found.append((_list_event_id(job), job_public(job, waiting, **extra), job.id))
        return found

    key_check = StreamKeyCheck(request, user)
    if after is None:
        start = await run_in_threadpool(poll, None)
        after = (_parse_list_event_id(start[0][2]) if start
                 else (datetime(1970, 1, 1, tzinfo=timezone.utc), "0" * 26))
    last_sent = time.monotonic()
    while True:
        if await request.is_disconnected():
            return
        if (closing := await key_check.closing_event()) is not None:
            yield closing
            return
        for event_id, job, _ in await run_in_threadpool(poll, after):
            if job.id not in seen and job.created_at >= opened:
                kind = "created"
            elif seen.get(job.id) != job.status.value:
                kind = "status"
            else:
                kind = "progress"
            seen[job.id] = job.status.value
            yield f"id: {event_id}\nevent: {kind}\ndata: {job.model_dump_json()}\n\n"
            after, last_sent = _parse_list_event_id(event_id), time.monotonic()
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(LIST_POLL_S)


@router.get("/stream", response_class=StreamingResponse, tags=["events"], responses={
    200: {"description": "`text/event-stream` of changes to your jobs: `created`, `status` and "
                         "`progress` events, each a job as `GET /v1/jobs` lists it; each `id` "
                         "resumes the stream (Last-Event-ID). Ends with a `closed` event when "
                         "its API key is revoked or rotated out.",
          "content": {"text/event-stream": {}}},
    429: {"model": ErrorResponse, "description": "Too many open event streams of this user "
                                                "(METASERVE_MAX_EVENT_STREAMS_PER_USER)"},
})
async def stream_jobs(
    request: Request,
    user: CurrentUser,
    trials: Annotated[Literal["fold", "show", "only"], Query(
        description="As for `GET /v1/jobs`: `fold` leaves sweep trials out.")] = "fold",
    last_event_id: Annotated[str, Header(max_length=100)] = None,
    after: Annotated[str, Query(max_length=100, description="Like Last-Event-ID, for clients "
                                "that cannot set headers.")] = None,
) -> StreamingResponse:
    """One stream of every change to your jobs (created, status, progress), for a live list:
    a page keeps one of these open instead of polling each row."""
    resume = last_event_id or after
    start = _parse_list_event_id(resume) if resume else None
    return open_stream(request, user, _list_changes(request, user, trials, start))


@router.get("/{job_id}", response_model=JobPublic, responses={404: {"model": ErrorResponse}})
def get_job(job_id: PathText, user: CurrentUser, session: SessionDep,
            request: Request) -> Response:
    """The job with its status history and latest metric values."""
    with session.begin():
        job = job_store.get_job_row(session=session, job_id=job_id, owner=user)
        history = job_listing.status_history(session=session, job_id=job_id)
        latest = job_listing.latest_metrics(session=session, job_ids=[job_id])[job_id]
        driven = job_listing.driven_sweeps(session=session, job_ids=[job_id]).get(job_id)
    extra: dict[str, Any] = {
        "latest_metrics": latest,
        "status_history": [StatusEventPublic.model_validate(event) for event in history]}
    if driven is not None:
        extra["driver_of_sweep"], extra["trial_count"] = driven
    return model_response(job_public(job, _waiting(request), **extra))


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
def cancel_job(job_id: PathText, user: CurrentUser, session: SessionDep) -> Response:
    """queued → cancelled at once; running → cancelling (the dispatcher stops it); terminal → 409."""
    with session.begin():
        job = job_store.request_cancel(session=session, job_id=job_id, owner=user)
    return model_response(JobPublic.model_validate(job))
