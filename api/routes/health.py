from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from metaserve.api.deps import SessionDep
from metaserve.api.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Database unreachable"}})
def readyz(request: Request, session: SessionDep) -> JSONResponse:
    """The database is reachable (else 503). ``dispatcher`` says whether this process runs
    jobs: ``off``, ``connecting`` (to Ray; jobs wait queued meanwhile) or ``ready``."""
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return error_response(503, "not_ready", f"database unreachable: {type(exc).__name__}")
    dispatcher = getattr(request.app.state, "dispatcher", None)
    state = ("off" if dispatcher is None
             else "ready" if dispatcher.ray_ready.is_set() else "connecting")
    return JSONResponse({"status": "ok", "dispatcher": state})
