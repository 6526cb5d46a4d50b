"""``GET /v1/jobs/{id}/metrics``: a job's metric series, paged by step."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from metaserve.api.deps import NO_CONTROL_CHARACTERS, CurrentUser, PathText, SessionDep
from metaserve.api.schemas import ErrorResponse, MetricsPublic, metrics_response
from metaserve.service import jobs
from metaserve.service.job_store import MAX_METRICS_PAGE

DEFAULT_METRICS_PAGE = 1000

router = APIRouter(prefix="/v1/jobs", tags=["metrics"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job of yours"},
    422: {"model": ErrorResponse, "description": "A query parameter out of range, named"},
})


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def get_metrics(
    job_id: PathText,
    user: CurrentUser,
    session: SessionDep,
    name: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_CONTROL_CHARACTERS,
                                      description="Only this series, e.g. `train/loss`.")] = None,
    since_step: Annotated[int | None, Query(ge=0, le=2**62,
                                            description="Only steps after this one.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_METRICS_PAGE, description="Values per page "
                                "(whole steps).")] = DEFAULT_METRICS_PAGE,
) -> Response:
    """Metric values ordered by (step, name); follow `next_since_step` for the next page."""
    page, next_since_step = jobs.get_metrics_page(session=session, job_id=job_id, owner=user,
                                                  name=name, since_step=since_step, limit=limit)
    return metrics_response(page, next_since_step)
