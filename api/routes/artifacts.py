"""``GET /v1/jobs/{id}/artifacts`` and ``.../artifacts/{name}``: list and download a job's files.

A download is addressed by a name the database registered for the job and streamed from the
artifact store (a local directory or S3, :mod:`metaserve.workers.object_store`), which refuses any
name that is not a plain file name. Anything else is a 404; a store that fails is a 503.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from metaserve.api.deps import CurrentUser, PathText, SessionDep, SettingsDep
from metaserve.api.schemas import ArtifactPublic, ArtifactsPublic, ErrorResponse
from metaserve.service import artifacts, jobs
from metaserve.service.orm import Artifact
from metaserve.service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job of yours, or no such artifact"},
})


@router.get("/{job_id}/artifacts")
def list_artifacts(job_id: PathText, user: CurrentUser, session: SessionDep) -> ArtifactsPublic:
    """The job's checkpoints and final artifacts with size and sha256, by name."""
    return ArtifactsPublic(data=[
        ArtifactPublic.model_validate(artifact)
        for artifact in jobs.list_job_artifacts(session=session, job_id=job_id, owner=user)])


@router.get("/{job_id}/artifacts/{name}", response_class=StreamingResponse, responses={
    200: {"description": "The file", "content": {"application/octet-stream": {},
                                                 "application/json": {}}},
    503: {"model": ErrorResponse, "description": "The artifact store is unavailable"},
})
def download_artifact(job_id: PathText, name: PathText, user: CurrentUser, session: SessionDep,
                      settings: SettingsDep) -> StreamingResponse:
    """Download one artifact listed by `GET /v1/jobs/{id}/artifacts`."""
    artifact = jobs.get_artifact(session=session, job_id=job_id, owner=user, name=name)
    return stream_artifact(settings, job_id, artifact)


def stream_artifact(settings: Settings, job_id: str, artifact: Artifact) -> StreamingResponse:
    """The registered ``artifact`` of ``job_id`` streamed from the store (also a registered
    model version's files, :mod:`metaserve.api.routes.registered_models`)."""
    store = artifacts.get_store(settings.storage_config())
    size, chunks = artifacts.open_artifact(store, job_id, artifact.name)
    return StreamingResponse(chunks, media_type=artifact.media_type, headers={
        "content-length": str(size),
        "content-disposition": _attachment(artifact.name)})


def _attachment(name: str) -> str:
    """``attachment; filename=...`` as Starlette's FileResponse writes it."""
    quoted = quote(name)
    if quoted != name:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{name}"'
