"""Uploaded datasets as a resource: upload (converted by :mod:`metaserve.service.dataset_ingest`
in a child process), owner scoping, listing, deletion, what a dataset can serve
(``usable_for``, the default split's sizes), and the check of a job spec against the dataset it
names, at submit: everything the stored metadata can tell (classes per split for the ways,
images per class for the shots, a table's columns and rows per task) is a 422 naming the field
and the numbers, not a job that fails when it runs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from metaserve.service import dataset_checks
from metaserve.service.dataset_ingest import convert_in_child
from metaserve.service.exceptions import (DatasetInUse, DatasetNotFound, DatasetPathForbidden,
                                          DatasetReferenceInvalid)
from metaserve.service.ids import new_id
from metaserve.service.jobs import Transaction
from metaserve.service.orm import Dataset, Job, JobStatus, User
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec
from metaserve.workers.object_store import ArtifactStore

logger = logging.getLogger(__name__)

DATASET_ID_PREFIX = "ds_"
ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.CANCELLING.value)
MAX_PAGE = 100


def new_dataset_id() -> str:
    return DATASET_ID_PREFIX + new_id()


# --------------------------------------------------------------------------- the resource


def create_dataset(*, session: Session, owner: User, upload: Path, name: str, size: int,
                   sha256: str, settings: Settings, store: ArtifactStore) -> Dataset:
    """Convert the spooled ``upload`` (in a child process), publish its canonical files and
    record the dataset. Whatever fails, nothing is kept: the work directory goes, and stored
    objects of a dataset that was not recorded are removed."""
    settings.upload_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="convert-", dir=settings.upload_dir))
    dataset_id = new_dataset_id()
    published = False
    try:
        converted = convert_in_child(upload, workdir, settings)
        store.put(dataset_id, [workdir / name for name in converted.files])
        published = True
        with Transaction(session):
            dataset = Dataset(id=dataset_id, owner_id=owner.id, name=name, kind=converted.kind,
                              format=converted.format, classes=converted.classes,
                              images=converted.images, shape=converted.shape, bytes=size,
                              sha256=sha256, status="ready",
                              meta=dataset_checks.recorded_meta(converted.meta))
            session.add(dataset)
        published = False  # recorded: kept
        logger.info("dataset uploaded", extra={"dataset_id": dataset_id, "kind": converted.kind,
                                               "format": converted.format})
        return dataset
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if published:
            store.delete(dataset_id)


def _visible(owner: User):  # noqa: ANN202
    query = select(Dataset)
    return query if owner.is_admin else query.where(Dataset.owner_id == owner.id)


def get_dataset(*, session: Session, dataset_id: str, owner: User) -> Dataset:
    """``owner``'s dataset (any, for an admin); another user's is :class:`DatasetNotFound`."""
    with Transaction(session):
        dataset = session.scalars(_visible(owner).where(Dataset.id == dataset_id)).one_or_none()
    if dataset is None:
        raise DatasetNotFound(dataset_id=dataset_id)
    return dataset


def list_datasets(*, session: Session, owner: User, cursor: str | None = None,
                  limit: int = 50) -> tuple[list[Dataset], str | None]:
    """``owner``'s datasets newest first (an admin's: everyone's), a page of ``limit``; the
    cursor is the last id of the previous page."""
    query = _visible(owner).order_by(Dataset.id.desc()).limit(limit + 1)
    if cursor:  # an empty cursor (`cursor=`) is the first page
        query = query.where(Dataset.id < cursor)
    with Transaction(session):
        rows = list(session.scalars(query))
    page = rows[:limit]
    return page, page[-1].id if len(rows) > limit else None


def jobs_using(*, session: Session, dataset_id: str) -> list[str]:
    """Ids of the queued or running jobs whose spec names ``dataset_id``."""
    rows = session.execute(select(Job.id, Job.spec).where(Job.status.in_(ACTIVE_STATUSES)))
    return [job_id for job_id, spec in rows
            if (spec.get("task_family") or {}).get("dataset") == dataset_id]


def delete_dataset(*, session: Session, dataset_id: str, owner: User,
                   store: ArtifactStore) -> None:
    """Delete ``owner``'s dataset, its row then its stored files; :class:`DatasetInUse`
    (409, naming the jobs) while a queued or running job uses it."""
    with Transaction(session):
        dataset = session.scalars(_visible(owner).where(Dataset.id == dataset_id)
                                  .with_for_update()).one_or_none()
        if dataset is None:
            raise DatasetNotFound(dataset_id=dataset_id)
        using = jobs_using(session=session, dataset_id=dataset_id)
        if using:
            raise DatasetInUse(f"dataset {dataset_id} is used by the queued or running job(s) "
                               f"{', '.join(using)}; cancel them or wait for them to finish",
                               jobs=", ".join(using))
        session.delete(dataset)
    store.delete(dataset_id)


def check_job_data(*, session: Session, owner: User, spec: JobSpec,
                   settings: Settings) -> JobSpec:
    """At submit: the dataset a spec names must be one ``owner`` may use (422 naming
    ``task_family.dataset``) and able to serve the spec (422 naming the field and the numbers:
    :mod:`metaserve.service.dataset_checks`); a raw ``path`` is an admin's (or under the data
    root), 403 naming ``task_family.path`` otherwise. Returns the spec to store: a ``tabular``
    family's resolved (its ``features`` listed explicitly)."""
    family = spec.task_family
    if family.name not in ("images", "tabular"):
        return spec
    if getattr(family, "dataset", None) is not None:
        try:
            dataset = get_dataset(session=session, dataset_id=family.dataset, owner=owner)
        except DatasetNotFound:
            raise DatasetReferenceInvalid(
                f"task_family.dataset: no dataset {family.dataset} of yours",
                **{"task_family.dataset": f"no dataset {family.dataset} of yours "
                                          "(GET /v1/datasets lists them)"}) from None
        resolved = dataset_checks.check_family(family, kind=dataset.kind, meta=dataset.meta)
        return spec if resolved is family else spec.model_copy(update={"task_family": resolved})
    if owner.is_admin or _under_data_root(family.path, settings.data_root):
        return spec
    raise DatasetPathForbidden(
        "task_family.path: only an admin key may name a dataset path on the server; upload "
        "the dataset (POST /v1/datasets) and name it with task_family.dataset",
        **{"task_family.path": "admin keys only" + (
            f" (or a path under {settings.data_root})" if settings.data_root else "")})


def _under_data_root(path: str | None, data_root: str) -> bool:
    if not path or not data_root:
        return False
    root = Path(data_root).resolve()
    target = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    return target.is_relative_to(root)
