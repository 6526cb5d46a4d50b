"""``POST /v1/jobs/{id}/adapt``: adapt a succeeded job's meta-initialization to a support
set with the job's recipe and return the predictions on the query inputs.

Sizes are checked before any work (rows by the schema: 422; numbers per array: 413, both
naming the field) and the job (404/409) in the API process, then shapes against the job's task
family (422), loading and adapting in the application's
:class:`~metaserve.service.adapt_pool.AdaptPool`: processes of their own, bounded, with a
timeout (503 when full, 504 when late), never on the event loop, in the threadpool other
routes share, or under the API process's GIL.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from metaserve.api.deps import CurrentUser, PathText, SettingsDep
from metaserve.api.schemas import MAX_ADAPT_VALUES, AdaptRequest, AdaptResponse, ErrorResponse
from metaserve.service import adaptation
from metaserve.service.adapt_pool import AdaptPool

router = APIRouter(prefix="/v1/jobs", tags=["adapt"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job of yours"},
    409: {"model": ErrorResponse, "description": "The job has not succeeded (no meta-initialization), "
                                                "or it is a meta-RL job (its meta-policy adapts by "
                                                "acting: Client.load_meta_policy)"},
    413: {"model": ErrorResponse, "description": "An array above the size bounds, named"},
    422: {"model": ErrorResponse, "description": "Arrays that do not fit the task family, "
                                                "named; or non-finite predictions (diverged)"},
    503: {"model": ErrorResponse, "description": "Every adapt process busy and the queue full "
                                                "(or one died); see Retry-After"},
    504: {"model": ErrorResponse, "description": "The adaptation did not finish in time"},
})

@router.post("/{job_id}/adapt")
async def adapt_job(job_id: PathText, body: AdaptRequest, request: Request, user: CurrentUser,
                    settings: SettingsDep) -> AdaptResponse:
    """Adapt the job's meta-initialization to `support_x`/`support_y` with its recipe (or
    `steps` inner steps) and predict `query_x`; a tabular job takes a new entity's raw rows
    (`support`, `query`) and predicts in the target's units."""
    factory = request.app.state.session_factory

    def prepare() -> adaptation.AdaptWork:
        with factory() as session:
            return adaptation.prepare_adaptation(
                session=session, job_id=job_id, owner=user,
                arrays=body.inputs(),
                steps=body.steps, max_values=MAX_ADAPT_VALUES, storage=settings.storage_config())

    return AdaptResponse(**await adapt_pool(request).run(prepare))


def adapt_pool(request: Request) -> AdaptPool:
    return request.app.state.adapt_pool
