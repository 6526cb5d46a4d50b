"""``/v1/models``: registered models, their numbered versions and aliases (MLflow's model
registry; :mod:`metaserve.service.registered_models` holds the rules). A version's files are
its job's final artifact, downloaded by version number or by alias."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status
from fastapi.responses import StreamingResponse

from metaserve.api.deps import CurrentUser, PathText, SessionDep, SettingsDep
from metaserve.api.routes.artifacts import stream_artifact
from metaserve.api.schemas import (ErrorResponse, ModelAliasSet, ModelVersionCreate,
                                   ModelVersionPublic, ModelVersionsPublic, RegisteredModelCreate,
                                   RegisteredModelPublic, RegisteredModelsPublic)
from metaserve.service import registered_models
from metaserve.service.registered_models import (ALIAS_PATTERN, MODEL_NAME_PATTERN,
                                                   RESERVED_ALIAS_PATTERN)

router = APIRouter(prefix="/v1/models", tags=["registered models"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such model of yours, version or alias"},
    422: {"model": ErrorResponse, "description": "Invalid request; the field is named"},
})

ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, max_length=100)]
# The reserved names (latest, v3) said in the schema too; the service refuses them (422).
AliasName = Annotated[str, Path(pattern=ALIAS_PATTERN, max_length=100, json_schema_extra={
    "not": {"pattern": RESERVED_ALIAS_PATTERN}})]
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]  # an INTEGER column


@router.post("", status_code=status.HTTP_201_CREATED, responses={
    409: {"model": ErrorResponse, "description": "You already have a model of this name"}})
def create_model(body: RegisteredModelCreate, user: CurrentUser,
                 session: SessionDep, response: Response) -> RegisteredModelPublic:
    """A new registered model with no versions yet."""
    view = registered_models.create_model(session=session, owner=user, name=body.name,
                                          description=body.description)
    response.headers["Location"] = f"/v1/models/{body.name}"
    return RegisteredModelPublic.of(view)


@router.get("")
def list_models(user: CurrentUser, session: SessionDep) -> RegisteredModelsPublic:
    """Your registered models by name, each with its latest version and aliases."""
    return RegisteredModelsPublic(data=[RegisteredModelPublic.of(view) for view in
                                        registered_models.list_models(session=session, owner=user)])


@router.get("/{name}")
def get_model(name: ModelName, user: CurrentUser, session: SessionDep) -> RegisteredModelPublic:
    return RegisteredModelPublic.of(registered_models.get_model(session=session, owner=user,
                                                                name=name))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(name: ModelName, user: CurrentUser, session: SessionDep) -> Response:
    """Delete the model, its versions and aliases; the jobs stay."""
    registered_models.delete_model(session=session, owner=user, name=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/versions", status_code=status.HTTP_201_CREATED, responses={
    409: {"model": ErrorResponse, "description": "The job is not succeeded or has no final "
          "artifact (code not_ready, the field named)"}})
def register_version(name: ModelName, body: ModelVersionCreate, user: CurrentUser,
                     session: SessionDep, response: Response) -> ModelVersionPublic:
    """The next version, from a succeeded job of yours or the best trial of a sweep of yours."""
    view = registered_models.register_version(session=session, owner=user, name=name,
                                              job_id=body.job_id, sweep_id=body.sweep_id,
                                              description=body.description)
    response.headers["Location"] = f"/v1/models/{name}/versions/{view.version.version}"
    return ModelVersionPublic.of(view)


@router.get("/{name}/versions")
def list_versions(name: ModelName, user: CurrentUser, session: SessionDep) -> ModelVersionsPublic:
    """The model's versions, newest first."""
    return ModelVersionsPublic(data=[ModelVersionPublic.of(view) for view in
                                     registered_models.list_versions(session=session, owner=user,
                                                                     name=name)])


@router.get("/{name}/versions/{version}")
def get_version(name: ModelName, version: VersionNumber, user: CurrentUser,
                session: SessionDep) -> ModelVersionPublic:
    return ModelVersionPublic.of(registered_models.get_version(
        session=session, owner=user, name=name, version=version))


@router.delete("/{name}/versions/{version}", status_code=status.HTTP_204_NO_CONTENT)
def delete_version(name: ModelName, version: VersionNumber, user: CurrentUser,
                   session: SessionDep) -> Response:
    """Delete one version and the aliases pointing at it; its number is not given again."""
    registered_models.delete_version(session=session, owner=user, name=name, version=version)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put("/{name}/aliases/{alias}")
def set_alias(name: ModelName, alias: AliasName, body: ModelAliasSet, user: CurrentUser,
              session: SessionDep) -> ModelVersionPublic:
    """Point the alias at a version (create it, or move it); answers that version."""
    return ModelVersionPublic.of(registered_models.set_alias(
        session=session, owner=user, name=name, alias=alias, version=body.version))


@router.get("/{name}/aliases/{alias}")
def get_alias(name: ModelName, alias: AliasName, user: CurrentUser,
              session: SessionDep) -> ModelVersionPublic:
    """The version the alias points at."""
    return ModelVersionPublic.of(registered_models.get_alias(session=session, owner=user,
                                                             name=name, alias=alias))


@router.delete("/{name}/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT)
def delete_alias(name: ModelName, alias: AliasName, user: CurrentUser,
                 session: SessionDep) -> Response:
    registered_models.delete_alias(session=session, owner=user, name=name, alias=alias)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


_DOWNLOAD = {200: {"description": "The file", "content": {"application/octet-stream": {},
                                                          "application/json": {}}},
             503: {"model": ErrorResponse, "description": "The artifact store is unavailable"}}


@router.get("/{name}/versions/{version}/artifacts/{artifact}",
            response_class=StreamingResponse, responses=_DOWNLOAD)
def download_version_artifact(name: ModelName, version: VersionNumber, artifact: PathText,
                              user: CurrentUser, session: SessionDep,
                              settings: SettingsDep) -> StreamingResponse:
    """One file of the version's final artifact (`meta_init.safetensors`, `meta_init.json`,
    or `meta_policy.*`)."""
    job_id, record = registered_models.version_artifact(
        session=session, owner=user, name=name, version=version, artifact=artifact)
    return stream_artifact(settings, job_id, record)


@router.get("/{name}/aliases/{alias}/artifacts/{artifact}",
            response_class=StreamingResponse, responses=_DOWNLOAD)
def download_alias_artifact(name: ModelName, alias: AliasName, artifact: PathText,
                            user: CurrentUser, session: SessionDep,
                            settings: SettingsDep) -> StreamingResponse:
    """One file of the final artifact of the version the alias points at now."""
    job_id, record = registered_models.version_artifact(
        session=session, owner=user, name=name, alias=alias, artifact=artifact)
    return stream_artifact(settings, job_id, record)
