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

from metaserve.service import dataset_checks, job_store
from metaserve.service.dataset_ingest import convert_in_child
from metaserve.service.exceptions import (DatasetInUse, DatasetNotFound, DatasetPathForbidden,
                                          DatasetQuotaExceeded, DatasetReferenceInvalid)
from metaserve.service.ids import new_id
from metaserve.service.orm import Dataset, Job, JobStatus, User
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec
from metaserve.workers.object_store import ArtifactStore

logger = logging.getLogger(__name__)

DATASET_ID_PREFIX = "ds_"
ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.CANCELLING.value)
MAX_PAGE = 100
UPLOAD_LOCK = 0x6473  # "ds": orders one owner's dataset recordings (PostgreSQL advisory lock)
COUNT_QUOTA_SETTING = "METASERVE_DATASET_MAX_PER_USER"
BYTES_QUOTA_SETTING = "METASERVE_DATASET_MAX_BYTES_PER_USER"


def new_dataset_id() -> str:
    return DATASET_ID_PREFIX + new_id()


# --------------------------------------------------------------------------- the resource


def create_dataset(*, session: Session, owner: User, upload: Path, name: str, size: int,
                   sha256: str, settings: Settings, store: ArtifactStore) -> Dataset:
    """Convert the spooled ``upload`` (in a child process), publish its canonical files and
    record the dataset. Whatever fails, nothing is kept: the work directory goes, and stored
    objects of a dataset that was not recorded are removed."""
    check_dataset_quota(session=session, owner=owner, settings=settings)
    settings.upload_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="convert-", dir=settings.upload_dir))
    dataset_id = new_dataset_id()
    published = False
    try:
        converted = convert_in_child(upload, workdir, settings)
        stored = sum((workdir / name).stat().st_size for name in converted.files)
        # Checked before publishing (a refused upload costs the store nothing) and again,
        # under the owner's lock, in the transaction that records it: concurrent uploads of
        # one owner cannot pass the quota together.
        check_dataset_quota(session=session, owner=owner, settings=settings, adding=stored)
        store.put(dataset_id, [workdir / name for name in converted.files])
        published = True
        with session.begin():
            check_dataset_quota(session=session, owner=owner, settings=settings, adding=stored,
                                lock=True)
            dataset = Dataset(id=dataset_id, owner_id=owner.id, name=name, kind=converted.kind,
                              format=converted.format, classes=converted.classes,
                              images=converted.images, shape=converted.shape, bytes=size,
                              sha256=sha256, status="ready",
                              meta={**dataset_checks.recorded_meta(converted.meta),
                                    "stored_bytes": stored})
            session.add(dataset)
        published = False  # recorded: kept
        logger.info("dataset uploaded", extra={"dataset_id": dataset_id, "kind": converted.kind,
                                               "format": converted.format})
        return dataset
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if published:
            store.delete(dataset_id)


def stored_bytes(dataset_bytes: int, meta: dict | None) -> int:
    """A dataset's stored size: its canonical files (recorded since the quotas), else (a row
    from before) the upload's size."""
    return int((meta or {}).get("stored_bytes", dataset_bytes))


def check_dataset_quota(*, session: Session, owner: User, settings: Settings, adding: int = 0,
                        lock: bool = False) -> None:
    """Refuse (:class:`DatasetQuotaExceeded`, 429 naming the setting) one more dataset of
    ``adding`` stored bytes for ``owner`` past ``dataset_max_per_user`` datasets or
    ``dataset_max_bytes_per_user`` stored bytes; admin keys are exempt, as from the job
    quotas. ``lock``: inside the recording transaction, after ordering the owner's uploads."""
    max_count, max_bytes = settings.dataset_max_per_user, settings.dataset_max_bytes_per_user
    if owner.is_admin or not (max_count or max_bytes):
        return
    if lock:
        job_store.lock_owner(session, owner.id, UPLOAD_LOCK)
    rows = session.execute(select(Dataset.bytes, Dataset.meta)
                           .where(Dataset.owner_id == owner.id)).all()
    if not lock:
        session.rollback()  # end the read's transaction: the conversion takes minutes
    used = sum(stored_bytes(size, meta) for size, meta in rows)
    if max_count and len(rows) >= max_count:
        raise DatasetQuotaExceeded(
            f"{owner.name} has {len(rows)} datasets, the most {COUNT_QUOTA_SETTING} allows; "
            "delete one before uploading another", limit=COUNT_QUOTA_SETTING, count=len(rows),
            cap=max_count)
    if max_bytes and used + adding > max_bytes:
        wanted = f" and this one {adding:,}" if adding else ""
        raise DatasetQuotaExceeded(
            f"{owner.name}'s datasets store {used:,} bytes{wanted}, more than the "
            f"{max_bytes:,} {BYTES_QUOTA_SETTING} allows; delete one before uploading another",
            limit=BYTES_QUOTA_SETTING, stored_bytes=used, adding=adding, cap=max_bytes)


def _visible(owner: User):  # noqa: ANN202
    query = select(Dataset)
    return query if owner.is_admin else query.where(Dataset.owner_id == owner.id)


def get_dataset(*, session: Session, dataset_id: str, owner: User) -> Dataset:
    """``owner``'s dataset (any, for an admin); another user's is :class:`DatasetNotFound`."""
    with session.begin():
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
    with session.begin():
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
    with session.begin():
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
