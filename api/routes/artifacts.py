"""``GET /v1/jobs/{id}/artifacts`` and ``.../artifacts/{name}``: list and download a job's files.

A download is addressed by a name the database registered for the job; the file is found
by :func:`metaserve.service.artifacts.locate`, which lists the job's directories and never joins the
client's string into a path. Anything else is a 404.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from metaserve.api.deps import CurrentUser, SessionDep, SettingsDep
from metaserve.api.schemas import ArtifactPublic, ArtifactsPublic, ErrorResponse
from metaserve.service import artifacts, jobs

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job of yours, or no such artifact"},
})


@router.get("/{job_id}/artifacts")
def list_artifacts(job_id: str, user: CurrentUser, session: SessionDep) -> ArtifactsPublic:
    """The job's checkpoints and final artifacts with size and sha256, by name."""
    return ArtifactsPublic(data=[
        ArtifactPublic.model_validate(artifact)
        for artifact in jobs.list_job_artifacts(session=session, job_id=job_id, owner=user)])


@router.get("/{job_id}/artifacts/{name}", response_class=FileResponse, responses={
    200: {"description": "The file", "content": {"application/octet-stream": {},
                                                 "application/json": {}}},
})
def download_artifact(job_id: str, name: str, user: CurrentUser, session: SessionDep,
                      settings: SettingsDep) -> FileResponse:
    """Download one artifact listed by `GET /v1/jobs/{id}/artifacts`."""
    artifact = jobs.get_artifact(session=session, job_id=job_id, owner=user, name=name)
    path = artifacts.locate(settings.artifact_root, job_id, artifact.name)
    if path is None:
        raise artifacts.ArtifactNotFound("Artifact file is missing.", job_id=job_id,
                                         name=artifact.name)
    return FileResponse(path, media_type=artifact.media_type, filename=artifact.name,
                        content_disposition_type="attachment")
