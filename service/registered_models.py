"""Registered models: what a user keeps. A registered model is a name with numbered versions,
each the final artifact of one of its owner's succeeded jobs (a sweep's best trial included),
and aliases (``production``) that point at a version and move between versions: MLflow's model
registry (``models:/NAME/3``, ``models:/NAME@production``). Jobs are how a result was made;
a version is the result kept.

A version references its job's artifacts (nothing is copied): the job cannot be deleted while
a version uses it (``model_versions.job_id`` has no ``ON DELETE``). Everything is owner-scoped:
another user's model, even for an admin, is a 404, because names are unique per owner only.

Versions are numbered by ``registered_models.last_version``, incremented by the first
statement of the registering transaction (``UPDATE ... RETURNING``): PostgreSQL makes a
concurrent registration wait on the row and re-read it, SQLite takes its write lock there
(a write first, so no stale read snapshot has to be upgraded), and either way two
registrations at once get two numbers. A refused registration rolls its number back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from metaserve.service import job_store
from metaserve.service.exceptions import (ArtifactNotFound, InvalidVersionSource, JobNotFound,
                                          JobNotRegistrable, ModelAliasNotFound,
                                          ModelVersionNotFound, RegisteredModelExists, ReservedAlias,
                                          RegisteredModelNotFound, SweepNotFound)
from metaserve.service.orm import (Artifact, Job, JobStatus, ModelAlias, ModelVersion,
                                   RegisteredModel, Sweep, User, utcnow)
from metaserve.service.sweeps import leaderboard

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""A model's name: a path segment of ``/v1/models/{name}`` and of ``models:/NAME@ALIAS``, so no
``/`` or ``@``."""
ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$"
"""An alias: starts with a letter or ``_``, so it never reads as a version number."""
RESERVED_ALIAS_PATTERN = r"^([Ll][Aa][Tt][Ee][Ss][Tt]|[Vv][0-9]+)$"
RESERVED_ALIASES = re.compile(RESERVED_ALIAS_PATTERN)
"""Names MLflow reserves for versions (``latest``, ``v3``): refused as aliases."""

FINAL_ARTIFACTS = {"meta_init": ("meta_init.safetensors", "meta_init.json"),
                   "meta_policy": ("meta_policy.safetensors", "meta_policy.json")}
"""The files of each kind of final artifact a version can hold."""


@dataclass
class VersionView:
    """A version as the API shows it: its model's name, the job it was taken from (and that
    job's sweep, for a sweep's trial) and the aliases pointing at it."""

    model: str
    version: ModelVersion
    sweep_id: str | None
    aliases: list[str] = field(default_factory=list)


@dataclass
class ModelView:
    """A registered model with its latest version number and its aliases (alias → version)."""

    model: RegisteredModel
    latest_version: int | None
    version_count: int
    aliases: dict[str, int]


def _model(session: Session, owner: User, name: str) -> RegisteredModel:
    model = session.scalars(select(RegisteredModel).where(
        RegisteredModel.owner_id == owner.id, RegisteredModel.name == name)).one_or_none()
    if model is None:
        raise RegisteredModelNotFound(name=name)
    return model


def _aliases(session: Session, model_id: int) -> dict[str, int]:
    return dict(session.execute(select(ModelAlias.alias, ModelAlias.version).where(
        ModelAlias.model_id == model_id).order_by(ModelAlias.alias)).all())


def _model_view(session: Session, model: RegisteredModel) -> ModelView:
    versions = session.scalars(select(ModelVersion.version).where(
        ModelVersion.model_id == model.id)).all()
    return ModelView(model=model, latest_version=max(versions, default=None),
                     version_count=len(versions), aliases=_aliases(session, model.id))


def _version_view(session: Session, model: RegisteredModel, version: ModelVersion) -> VersionView:
    aliases = [alias for alias, number in _aliases(session, model.id).items()
               if number == version.version]
    sweep_id = session.scalar(select(Job.sweep_id).where(Job.id == version.job_id))
    return VersionView(model=model.name, version=version, sweep_id=sweep_id, aliases=aliases)


def _version(session: Session, model: RegisteredModel, number: int) -> ModelVersion:
    version = session.scalars(select(ModelVersion).where(
        ModelVersion.model_id == model.id, ModelVersion.version == number)).one_or_none()
    if version is None:
        raise ModelVersionNotFound(version=f"{model.name} has no version {number}")
    return version


# --------------------------------------------------------------------------- models


def create_model(*, session: Session, owner: User, name: str,
                 description: str | None = None) -> ModelView:
    """A new registered model of ``owner`` with no versions; a name they already use is
    :class:`RegisteredModelExists` (409), nothing stored."""
    with session.begin():
        model = RegisteredModel(owner_id=owner.id, name=name, description=description,
                                last_version=0, created_at=utcnow(), updated_at=utcnow())
        session.add(model)
        try:
            session.flush()
        except IntegrityError:
            raise RegisteredModelExists(name=f"you already have a model named {name!r}") from None
        return ModelView(model=model, latest_version=None, version_count=0, aliases={})


def list_models(*, session: Session, owner: User) -> list[ModelView]:
    """``owner``'s registered models by name."""
    with session.begin():
        models = session.scalars(select(RegisteredModel).where(
            RegisteredModel.owner_id == owner.id).order_by(RegisteredModel.name)).all()
        return [_model_view(session, model) for model in models]


def get_model(*, session: Session, owner: User, name: str) -> ModelView:
    with session.begin():
        return _model_view(session, _model(session, owner, name))


def delete_model(*, session: Session, owner: User, name: str) -> None:
    """Delete the model, its versions and aliases; the jobs they were taken from stay."""
    with session.begin():
        session.delete(_model(session, owner, name))


def list_versions(*, session: Session, owner: User, name: str) -> list[VersionView]:
    """The model's versions, newest first."""
    with session.begin():
        model = _model(session, owner, name)
        versions = session.scalars(select(ModelVersion).where(
            ModelVersion.model_id == model.id).order_by(ModelVersion.version.desc())).all()
        return [_version_view(session, model, version) for version in versions]


# --------------------------------------------------------------------------- versions


def _final_artifact_kind(session: Session, job: Job) -> str:
    names = {artifact.name for artifact in job_store.list_artifacts(session=session, job_id=job.id)}
    for kind, files in FINAL_ARTIFACTS.items():
        if set(files) <= names:
            return kind
    raise JobNotRegistrable(job_id=f"job {job.id} has no final artifact "
                                   f"(meta_init.* or meta_policy.*) to register")


def _registrable_job(session: Session, owner: User, job_id: str) -> Job:
    job = session.scalars(select(Job).where(Job.id == job_id, Job.owner_id == owner.id)
                          ).one_or_none()
    if job is None:
        raise JobNotFound(job_id=job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise JobNotRegistrable(job_id=f"job {job_id} is {job.status}; only a succeeded job "
                                       "can become a model version")
    return job


def _best_trial(session: Session, owner: User, sweep_id: str) -> str:
    """The job id of the sweep's best succeeded trial by the sweep's metric."""
    sweep = session.scalars(select(Sweep).where(Sweep.id == sweep_id, Sweep.owner_id == owner.id)
                            ).one_or_none()
    if sweep is None:
        raise SweepNotFound(sweep_id=sweep_id)
    best = next((row for row in leaderboard(session=session, sweep=sweep)
                 if row["value"] is not None and row["status"] == JobStatus.SUCCEEDED.value), None)
    if best is None:
        raise JobNotRegistrable(sweep_id=f"sweep {sweep_id} has no succeeded trial with a value "
                                         f"of {sweep.config['scheduler']['metric']} yet")
    return best["job_id"]


def register_version(*, session: Session, owner: User, name: str, job_id: str | None = None,
                     sweep_id: str | None = None, description: str | None = None) -> VersionView:
    """A new version of ``owner``'s model ``name`` from their succeeded job ``job_id``, or from
    the best succeeded trial of their sweep ``sweep_id`` (exactly one of the two). A job that
    is not succeeded or has no final artifact is :class:`JobNotRegistrable` (409) naming the
    field; nothing is stored then, and the number is not used up."""
    if (job_id is None) == (sweep_id is None):
        raise InvalidVersionSource(job_id="give exactly one of job_id and sweep_id")
    with session.begin():
        # The write first (see the module's docstring): the number, and the model's existence.
        row = session.execute(
            update(RegisteredModel.__table__)
            .where(RegisteredModel.owner_id == owner.id, RegisteredModel.name == name)
            .values(last_version=RegisteredModel.last_version + 1, updated_at=utcnow())
            .returning(RegisteredModel.id, RegisteredModel.last_version)).one_or_none()
        if row is None:
            raise RegisteredModelNotFound(name=name)
        if sweep_id is not None:
            job_id = _best_trial(session, owner, sweep_id)
        assert job_id is not None
        job = _registrable_job(session, owner, job_id)
        version = ModelVersion(model_id=row.id, version=row.last_version, job_id=job.id,
                               artifact_kind=_final_artifact_kind(session, job),
                               description=description, created_at=utcnow())
        session.add(version)
        session.flush()
        return VersionView(model=name, version=version, sweep_id=job.sweep_id)


def get_version(*, session: Session, owner: User, name: str, version: int) -> VersionView:
    with session.begin():
        model = _model(session, owner, name)
        return _version_view(session, model, _version(session, model, version))


def delete_version(*, session: Session, owner: User, name: str, version: int) -> None:
    """Delete one version and the aliases pointing at it; its number is not given again."""
    with session.begin():
        model = _model(session, owner, name)
        session.execute(delete(ModelAlias).where(ModelAlias.model_id == model.id,
                                                 ModelAlias.version == version))
        session.delete(_version(session, model, version))


# --------------------------------------------------------------------------- aliases


def set_alias(*, session: Session, owner: User, name: str, alias: str,
              version: int) -> VersionView:
    """Point ``alias`` at ``version`` (create it, or move it from the version it named)."""
    if RESERVED_ALIASES.match(alias):
        raise ReservedAlias(alias=f"{alias!r} is reserved for version numbers (latest, v<N>)")
    with session.begin():
        model = _model(session, owner, name)
        target = _version(session, model, version)
        existing = session.get(ModelAlias, (model.id, alias))
        if existing is None:
            session.add(ModelAlias(model_id=model.id, alias=alias, version=version,
                                   updated_at=utcnow()))
        else:
            existing.version = version
        session.flush()
        return _version_view(session, model, target)


def get_alias(*, session: Session, owner: User, name: str, alias: str) -> VersionView:
    """The version ``alias`` points at."""
    with session.begin():
        model = _model(session, owner, name)
        found = session.get(ModelAlias, (model.id, alias))
        if found is None:
            raise ModelAliasNotFound(alias=f"{name} has no alias {alias!r}")
        return _version_view(session, model, _version(session, model, found.version))


def delete_alias(*, session: Session, owner: User, name: str, alias: str) -> None:
    with session.begin():
        model = _model(session, owner, name)
        found = session.get(ModelAlias, (model.id, alias))
        if found is None:
            raise ModelAliasNotFound(alias=f"{name} has no alias {alias!r}")
        session.delete(found)


def version_artifact(*, session: Session, owner: User, name: str, artifact: str,
                     version: int | None = None, alias: str | None = None
                     ) -> tuple[str, Artifact]:
    """``(job_id, record)`` of the file ``artifact`` of a version, addressed by its number or
    by an alias: the job's own record (only the version's final artifact files are served;
    checkpoints are the job's)."""
    view = (get_version(session=session, owner=owner, name=name, version=version)
            if alias is None else get_alias(session=session, owner=owner, name=name, alias=alias))
    job_id = view.version.job_id
    if artifact not in FINAL_ARTIFACTS[view.version.artifact_kind]:
        raise ArtifactNotFound(name=f"a {view.version.artifact_kind} version has "
                                    f"{', '.join(FINAL_ARTIFACTS[view.version.artifact_kind])}")
    with session.begin():
        for record in job_store.list_artifacts(session=session, job_id=job_id):
            if record.name == artifact:
                return job_id, record
    raise ArtifactNotFound(job_id=job_id, name=artifact)


def versions_of_job(*, session: Session, job_id: str) -> list[tuple[str, int]]:
    """``(model name, version)`` of every version taken from ``job_id``: what must go before
    the job may (a job deletion or artifact clean-up asks this first)."""
    with session.begin():
        return [tuple(row) for row in session.execute(
            select(RegisteredModel.name, ModelVersion.version)
            .join(RegisteredModel, RegisteredModel.id == ModelVersion.model_id)
            .where(ModelVersion.job_id == job_id).order_by(RegisteredModel.name,
                                                          ModelVersion.version))]
