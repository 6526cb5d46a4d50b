"""``/v1/sweeps``: hyperparameter sweeps run by Ray Tune, each trial a job
(:mod:`metaserve.service.sweeps`, docs/SWEEPS.md). Trials are listed with
``GET /v1/jobs?sweep=<id>`` too, and their metrics, events, logs and artifacts come from the
job routes; the sweep's own artifacts (the best trial's ``meta_init.*`` and ``sweep.json``) are
its driver job's: ``GET /v1/jobs/{driver_job_id}/artifacts``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from pydantic import BaseModel, Field, model_validator

from metaserve.api.deps import NO_CONTROL_CHARACTERS, CurrentUser, PathText, SessionDep
from metaserve.api.schemas import ErrorResponse, model_response
from metaserve.service import sweeps
from metaserve.service.jobs import outcome
from metaserve.service.orm import JobStatus
from metaserve.service.job_store import MAX_PAGE
from metaserve.workers.sweep_spec import SweepSpec

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    422: {"model": ErrorResponse, "description": "Invalid sweep; the field is named (a space "
          "path, a domain, num_samples, scheduler.metric, ...)"},
})


class TrialPublic(BaseModel):
    trial_id: str | None = Field(description="Ray Tune's trial id.")
    job_id: str = Field(description="The trial's job: GET /v1/jobs/{job_id}, its metrics, events, "
                                    "logs and artifacts.")
    status: JobStatus
    message: str | None
    config: dict[str, Any] = Field(description="The trial's value of each path of the space.")
    metric: str
    value: float | None = Field(description="The trial's last value of the metric (its final "
                                            "evaluation when it finished).")
    step: int | None = Field(description="The iteration of that value.")
    test_metric: str | None = Field(None, description="The metric's held-out counterpart "
                                    "(`val/x` → `test/x`), on test tasks no trial is selected "
                                    "or stopped by; null when the metric has none.")
    test_value: float | None = Field(None, description="The trial's final value of "
                                     "test_metric (evaluated once, after its last iteration): "
                                     "the unbiased score of a trial selected by `value`.")
    test_note: str | None = Field(None, description="Why test_value is null (the metric has "
                                  "no test counterpart; the trial stopped before its final "
                                  "evaluation; not yet finished).")
    iteration: int | None = Field(description="Iterations the trial ran.")
    attempt: int
    outcome: str | None = Field(None, description="As a job's: `stopped` for a trial the "
                                                  "scheduler stopped early.")

    @model_validator(mode="after")
    def _outcome(self) -> "TrialPublic":
        self.outcome = outcome(self.status.value, self.message)
        return self


class SweepPublic(BaseModel):
    id: str
    name: str
    status: JobStatus = Field(description="The driver job's status.")
    driver_job_id: str = Field(description="The job running the Tune driver: its logs, attempts, "
                                           "and the sweep's artifacts.")
    config: dict[str, Any] = Field(description="The sweep as validated: spec, space, search, "
                                               "scheduler (metric and mode filled in), num_samples, "
                                               "max_concurrent_trials, trials (planned).")
    trials: dict[str, int] = Field(description="Trial jobs by status (started trials only).")
    best: TrialPublic | None = Field(description="The best trial so far by the metric, with "
                                     "its held-out test score (test_value).")
    attempt: int
    message: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, view: sweeps.SweepView) -> "SweepPublic":
        driver = view.driver
        return cls(id=view.sweep.id, name=view.sweep.name, status=driver.status,
                   driver_job_id=driver.id, config=view.sweep.config, trials=view.counts,
                   best=view.best, attempt=driver.attempt, message=driver.message,
                   error=driver.error, created_at=view.sweep.created_at,
                   started_at=driver.started_at, finished_at=driver.finished_at)


class SweepsPublic(BaseModel):
    data: list[SweepPublic]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class TrialsPublic(BaseModel):
    sweep: SweepPublic
    data: list[TrialPublic] = Field(description="The leaderboard: best first by the metric "
                                                "(mode), trials without a value last.")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SweepPublic, responses={
    200: {"model": SweepPublic, "description": "Replay of an Idempotency-Key: the existing sweep"},
    409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body"},
    429: {"model": ErrorResponse, "description": "MAX_QUEUED_JOBS_PER_USER reached"},
})
def create_sweep(
    body: SweepSpec,
    user: CurrentUser,
    session: SessionDep,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=200,
                                                   pattern=NO_CONTROL_CHARACTERS)] = None,
) -> Response:
    """Validate a sweep (every sampled spec a valid job) and queue it."""
    view, created = sweeps.submit_sweep(session=session, owner=user, request=body,
                                        settings=request.app.state.settings,
                                        idempotency_key=idempotency_key)
    return model_response(SweepPublic.of(view),
                          status.HTTP_201_CREATED if created else status.HTTP_200_OK,
                          headers={"Location": f"/v1/sweeps/{view.sweep.id}"})


@router.get("", response_model=SweepsPublic, responses={400: {"model": ErrorResponse}})
def list_sweeps(
    user: CurrentUser,
    session: SessionDep,
    cursor: Annotated[str | None, Query(max_length=100, pattern=NO_CONTROL_CHARACTERS)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Your sweeps, newest first (an admin sees everyone's)."""
    page, next_cursor = sweeps.list_sweeps(session=session, owner=user, cursor=cursor, limit=limit)
    return model_response(SweepsPublic(data=[SweepPublic.of(view) for view in page],
                                       next_cursor=next_cursor))


@router.get("/{sweep_id}", response_model=SweepPublic, responses={404: {"model": ErrorResponse}})
def get_sweep(sweep_id: PathText, user: CurrentUser, session: SessionDep) -> Response:
    """Status, trial counts by status and the best trial so far."""
    return model_response(SweepPublic.of(sweeps.get_sweep(session=session, sweep_id=sweep_id,
                                                          owner=user)))


@router.get("/{sweep_id}/trials", response_model=TrialsPublic,
            responses={404: {"model": ErrorResponse}})
def sweep_trials(sweep_id: PathText, user: CurrentUser, session: SessionDep) -> Response:
    """The leaderboard: every started trial, its config, job id and metric, best first."""
    view, board = sweeps.sweep_trials(session=session, sweep_id=sweep_id, owner=user)
    return model_response(TrialsPublic(sweep=SweepPublic.of(view),
                                       data=[TrialPublic(**row) for row in board]))


@router.post("/{sweep_id}/cancel", response_model=SweepPublic,
             responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
def cancel_sweep(sweep_id: PathText, user: CurrentUser, session: SessionDep) -> Response:
    """Stop the sweep: every running trial ends cancelled (within seconds), the Tune driver and
    its trial actors stop; a finished sweep → 409."""
    return model_response(SweepPublic.of(sweeps.cancel_sweep(session=session, sweep_id=sweep_id,
                                                             owner=user)))
