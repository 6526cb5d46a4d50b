"""``POST /v1/jobs/{id}/adapt``: adapt a succeeded job's meta-initialization to a support
set with the job's recipe and return the predictions on the query inputs.

Sizes are checked before any work (rows by the schema: 422; numbers per array: 413, both
naming the field), then shapes against the job's task family (422). The route is a plain
``def``, so FastAPI runs it — loading and adapting included — in its threadpool, never on
the event loop. Loaded meta-initializations are kept per job in a small LRU
(:data:`CACHED_META_INITS`), keyed by the safetensors file's sha256 as well, so a replaced
artifact is never served stale.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from api.deps import CurrentUser, SessionDep, SettingsDep
from api.schemas import MAX_ADAPT_VALUES, AdaptRequest, AdaptResponse, ErrorResponse
from service import artifacts, jobs

CACHED_META_INITS = 4

router = APIRouter(prefix="/v1/jobs", tags=["adapt"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job of yours"},
    409: {"model": ErrorResponse, "description": "The job has not succeeded (no meta-initialization)"},
    413: {"model": ErrorResponse, "description": "An array above the size bounds, named"},
    422: {"model": ErrorResponse, "description": "Arrays that do not fit the task family, named"},
})


class MetaInitCache:
    """The last ``size`` loaded meta-initializations, least recently used evicted first."""

    def __init__(self, size: int = CACHED_META_INITS) -> None:
        self.size = size
        self._models: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str, sha256: str, directory: Path) -> Any:
        from workers.engine.artifacts import load_meta_init

        key = (job_id, sha256)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        model, _ = load_meta_init(directory)  # outside the lock: loading may take a moment
        with self._lock:
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return model

    def __len__(self) -> int:
        return len(self._models)


_cache_lock = threading.Lock()


def meta_init_cache(request: Request) -> MetaInitCache:
    """The application's cache (one per app, created on first use)."""
    with _cache_lock:
        cache = getattr(request.app.state, "meta_init_cache", None)
        if cache is None:
            cache = request.app.state.meta_init_cache = MetaInitCache()
        return cache


@router.post("/{job_id}/adapt")
def adapt_job(job_id: str, body: AdaptRequest, request: Request, user: CurrentUser,
              session: SessionDep, settings: SettingsDep) -> AdaptResponse:
    """Adapt the job's meta-initialization to `support_x`/`support_y` with its recipe (or
    `steps` inner steps) and predict `query_x`."""
    arrays = {"support_x": body.support_x, "support_y": body.support_y, "query_x": body.query_x}
    jobs.check_adapt_sizes(arrays, MAX_ADAPT_VALUES)
    job = jobs.get_adaptable_job(session=session, job_id=job_id, owner=user)
    support_x, support_y, query_x = jobs.to_adapt_tensors(job.spec, **arrays)
    tensors = jobs.get_artifact(session=session, job_id=job_id, owner=user,
                                name="meta_init.safetensors")
    path = artifacts.locate(settings.artifact_root, job_id, tensors.name)
    if path is None or artifacts.locate(settings.artifact_root, job_id, "meta_init.json") is None:
        raise artifacts.ArtifactNotFound("The meta-initialization files are missing.",
                                         job_id=job_id)
    model = meta_init_cache(request).get(job_id, tensors.sha256, path.parent)
    steps = model.algorithm.inner_steps if body.steps is None else body.steps
    predict = model.adapt(support_x, support_y, steps)
    output = predict(query_x).detach()
    labels = output.argmax(dim=-1).tolist() if model.algorithm.classification else None
    return AdaptResponse(predictions=output.tolist(), labels=labels, steps=steps,
                         algorithm=job.spec["algorithm"]["name"])
