from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from metaserve.api.deps import NO_CONTROL_CHARACTERS, CurrentUser, PathText, SessionDep
from metaserve.api.schemas import ErrorResponse, JobPublic, JobsPublic, model_response
from metaserve.service import datasets, job_store, jobs, limits
from metaserve.service.orm import JobStatus
from metaserve.service.job_store import MAX_PAGE
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


@router.get("", response_model=JobsPublic, responses={
    400: {"model": ErrorResponse, "description": "A cursor that no page of this list returned"},
})
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(max_length=100, pattern=NO_CONTROL_CHARACTERS)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    sweep: Annotated[str | None, Query(max_length=100, pattern=NO_CONTROL_CHARACTERS,
                                       description="A sweep's id: its trials only.")] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=200,
                                      pattern=NO_CONTROL_CHARACTERS,
                                      description="Only jobs whose name contains this, in any "
                                      "case (`%` and `_` match themselves). Pages with the same "
                                      "`name` follow each other by `cursor`.")] = None,
) -> Response:
    """Your jobs, newest first (an admin sees everyone's)."""
    with session.begin():
        page, next_cursor = job_store.list_jobs(session=session, owner=user, status=status_filter,
                                                cursor=cursor, limit=limit, sweep_id=sweep,
                                                name=name)
    return model_response(JobsPublic(data=[JobPublic.model_validate(job) for job in page],
                                     next_cursor=next_cursor))


@router.get("/{job_id}", response_model=JobPublic, responses={404: {"model": ErrorResponse}})
def get_job(job_id: PathText, user: CurrentUser, session: SessionDep) -> Response:
    with session.begin():
        job = job_store.get_job_row(session=session, job_id=job_id, owner=user)
    return model_response(JobPublic.model_validate(job))


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
def cancel_job(job_id: PathText, user: CurrentUser, session: SessionDep) -> Response:
    """queued → cancelled at once; running → cancelling (the dispatcher stops it); terminal → 409."""
    with session.begin():
        job = job_store.request_cancel(session=session, job_id=job_id, owner=user)
    return model_response(JobPublic.model_validate(job))
