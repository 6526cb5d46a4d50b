from __future__ import annotations

import threading

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from metaserve.api.deps import SessionDep
from metaserve.api.errors import error_response
from metaserve.service import artifacts

router = APIRouter(tags=["health"])

_health_lock = threading.Lock()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up. ``async``: answered on the event loop, not behind the route
    threadpool that database-bound routes (and open event streams' polls) queue in."""
    return {"status": "ok"}


def store_health(request: Request) -> artifacts.StoreHealth:
    """The application's cached store check (one per app and store, made on first use)."""
    store = artifacts.get_store(request.app.state.settings.storage_config())
    with _health_lock:
        health = getattr(request.app.state, "store_health", None)
        if health is None or health.store is not store:
            health = request.app.state.store_health = artifacts.StoreHealth(store)
        return health


@router.get("/readyz", responses={503: {"description": "Database or artifact store unreachable"}})
def readyz(request: Request, session: SessionDep) -> JSONResponse:
    """The database and the artifact store are reachable (else 503; the store's check is
    cached for a few seconds). ``dispatcher`` says whether this process runs jobs: ``off``,
    ``connecting`` (to Ray; jobs wait queued meanwhile) or ``ready``."""
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return error_response(503, "not_ready", f"database unreachable: {type(exc).__name__}")
    storage_error = store_health(request).error()
    if storage_error is not None:
        return error_response(503, "not_ready", f"storage unreachable: {storage_error}")
    dispatcher = getattr(request.app.state, "dispatcher", None)
    state = ("off" if dispatcher is None
             else "ready" if dispatcher.ray_ready.is_set() else "connecting")
    return JSONResponse({"status": "ok", "dispatcher": state})
