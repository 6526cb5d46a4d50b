"""``POST /v1/jobs/{id}/adapt``: adapt a succeeded job's meta-initialization to a support
set with the job's recipe and return the predictions on the query inputs.

Sizes are checked before any work (rows by the schema: 422; numbers per array: 413, both
naming the field), then shapes against the job's task family (422); see
:mod:`metaserve.service.adaptation`. The route is a plain ``def``, so FastAPI runs it — loading and
adapting included — in the application's :class:`~metaserve.service.adaptation.AdaptPool`
(threads of its own, bounded, with a timeout: 503 when full, 504 when late), never on the event
loop nor in the threadpool other routes share.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, Request

from metaserve.api.deps import CurrentUser, PathText, SettingsDep
from metaserve.api.schemas import MAX_ADAPT_VALUES, AdaptRequest, AdaptResponse, ErrorResponse
from metaserve.service import adaptation, artifacts

router = APIRouter(prefix="/v1/jobs", tags=["adapt"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job of yours"},
    409: {"model": ErrorResponse, "description": "The job has not succeeded (no meta-initialization)"},
    413: {"model": ErrorResponse, "description": "An array above the size bounds, named"},
    422: {"model": ErrorResponse, "description": "Arrays that do not fit the task family, "
                                                "named; or non-finite predictions (diverged)"},
    503: {"model": ErrorResponse, "description": "Every adapt thread busy and the queue full; "
                                                "see Retry-After"},
    504: {"model": ErrorResponse, "description": "The adaptation did not finish in time"},
})

_cache_lock = threading.Lock()


def meta_init_cache(request: Request) -> adaptation.MetaInitCache:
    """The application's cache (one per app, created on first use)."""
    with _cache_lock:
        cache = getattr(request.app.state, "meta_init_cache", None)
        if cache is None:
            cache = request.app.state.meta_init_cache = adaptation.MetaInitCache()
        return cache


@router.post("/{job_id}/adapt")
async def adapt_job(job_id: PathText, body: AdaptRequest, request: Request, user: CurrentUser,
                    settings: SettingsDep) -> AdaptResponse:
    """Adapt the job's meta-initialization to `support_x`/`support_y` with its recipe (or
    `steps` inner steps) and predict `query_x`."""
    factory = request.app.state.session_factory
    cache = meta_init_cache(request)
    store = artifacts.get_store(settings.storage_config())

    def work() -> dict:
        # A session of its own: after a 504 this thread may still run, past the request.
        with factory() as session:
            return adaptation.adapt_job(
                session=session, job_id=job_id, owner=user,
                arrays={"support_x": body.support_x, "support_y": body.support_y,
                        "query_x": body.query_x},
                steps=body.steps, max_values=MAX_ADAPT_VALUES, store=store, cache=cache)

    return AdaptResponse(**await adapt_pool(request).run(work))


def adapt_pool(request: Request) -> adaptation.AdaptPool:
    return request.app.state.adapt_pool
