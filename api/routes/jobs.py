from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from api.deps import CurrentUser, SessionDep
from api.schemas import ErrorResponse, JobPublic, JobsPublic
from service import jobs
from service.models import JobStatus
from service.store import MAX_PAGE
from workers.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    422: {"model": ErrorResponse, "description": "Invalid request; each bad field is named"},
})


@router.post("", status_code=status.HTTP_201_CREATED, responses={
    200: {"model": JobPublic, "description": "Replay of an Idempotency-Key: the existing job"},
    409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body"},
    413: {"model": ErrorResponse, "description": "Body above MAX_BODY_BYTES"},
})
def create_job(
    spec: JobSpec,
    user: CurrentUser,
    session: SessionDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    """Validate and queue a meta-training job."""
    job, created = jobs.submit_job(session=session, owner=user, spec=spec,
                                   idempotency_key=idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.model_validate(job)


@router.get("", responses={
    400: {"model": ErrorResponse, "description": "A cursor that no page of this list returned"},
})
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> JobsPublic:
    """Your jobs, newest first (an admin sees everyone's)."""
    page, next_cursor = jobs.list_jobs(session=session, owner=user, status=status_filter,
                                       cursor=cursor, limit=limit)
    return JobsPublic(data=[JobPublic.model_validate(job) for job in page],
                      next_cursor=next_cursor)


@router.get("/{job_id}", responses={404: {"model": ErrorResponse}})
def get_job(job_id: str, user: CurrentUser, session: SessionDep) -> JobPublic:
    return JobPublic.model_validate(jobs.get_job(session=session, job_id=job_id, owner=user))


@router.post("/{job_id}/cancel", responses={404: {"model": ErrorResponse},
                                            409: {"model": ErrorResponse}})
def cancel_job(job_id: str, user: CurrentUser, session: SessionDep) -> JobPublic:
    """queued → cancelled at once; running → cancelling (the dispatcher stops it); terminal → 409."""
    return JobPublic.model_validate(
        jobs.request_cancel(session=session, job_id=job_id, owner=user))
