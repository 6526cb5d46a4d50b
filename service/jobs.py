"""Job operations that are more than one store call: submit (the canonical spec, its hash and
the queue cap), the metrics page and the artifact records a route reads. Each runs in the
session's own transaction (``with session.begin():``, committed when the block ends, rolled
back when it raises). A single store call needs no wrapper here: a caller runs
:mod:`metaserve.service.job_store` or :mod:`metaserve.service.claims` in
``with session.begin():`` (a route's session has not begun one: no query runs before it)."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Row, Select, bindparam, select
from sqlalchemy.orm import Session

from metaserve.service import job_store
from metaserve.service.exceptions import ArtifactNotFound
from metaserve.service.job_store import spec_hash
from metaserve.service.orm import Artifact, Job, Metric, User
from metaserve.service.settings import QUOTA_RETRY_AFTER_S
from metaserve.workers.spec import JobSpec
from metaserve.workers.sweep_spec import STOPPED_EARLY


def canonical_spec(spec: JobSpec) -> dict[str, Any]:
    """The validated spec with every default filled in, as plain JSON data."""
    return spec.model_dump(mode="json")


def default_job_name(spec: JobSpec) -> str:
    return spec.name or f"{spec.algorithm.name}-{spec.task_family.name}"


def submit_job(*, session: Session, owner: User, spec: JobSpec,
               idempotency_key: str | None = None, max_queued: int = 0,
               retry_after_s: int = QUOTA_RETRY_AFTER_S) -> tuple[Job, bool]:
    """Store a queued job; returns ``(job, created)`` (False when an idempotent replay).

    ``max_queued`` (0: no cap): beyond that many queued jobs of ``owner``, raise
    :class:`~metaserve.service.exceptions.QuotaExceeded` (429, ``Retry-After: retry_after_s``)
    and store nothing; a replay of an existing job still returns it."""
    data = canonical_spec(spec)
    with session.begin():
        return job_store.create_job(session=session, owner=owner, name=default_job_name(spec),
                                spec=data, spec_hash=spec_hash(data),
                                max_attempts=spec.max_attempts, idempotency_key=idempotency_key,
                                max_queued=max_queued, retry_after_s=retry_after_s)


# --------------------------------------------------------------------------- metrics, artifacts (API)


_M, _J = Metric.__table__.c, Job.__table__.c


@functools.cache
def _metrics_statement(*, by_name: bool, after: bool, own: bool, one_step: bool) -> Select:
    """The read of a metrics page (``one_step``: of the values of one step), built once per
    combination of the optional filters (constructing a statement and its cache key costs
    more than running it on the index). The four columns a page shows as plain rows: ORM
    objects in the identity map were most of a page's time. ``own``: only if the job is the
    caller's (an uncorrelated EXISTS, evaluated once), so an ordinary user's page is one
    round trip; an admin may read any job."""
    query = select(_M.step, _M.name, _M.value, _M.created_at).where(
        _M.job_id == bindparam("job_id"))
    if own:
        query = query.where(select(_J.id).where(_J.id == bindparam("job_id"),
                                                _J.owner_id == bindparam("owner_id")).exists())
    if by_name:
        query = query.where(_M.name == bindparam("name"))
    if one_step:
        return query.where(_M.step == bindparam("step")).order_by(_M.name)
    if after:
        query = query.where(_M.step > bindparam("since_step"))
    return query.order_by(_M.step, _M.name).limit(bindparam("limit"))


def get_metrics_page(*, session: Session, job_id: str, owner: User, name: str | None = None,
                     since_step: int | None = None,
                     limit: int = 1000) -> tuple[list[Row], int | None]:
    """One page of a job's metrics ordered by (step, name) as rows of ``step``, ``name``,
    ``value``, ``created_at``, and the ``since_step`` of the next page (None on the last one).
    ``since_step`` is exclusive.

    A page holds whole steps, so paging by step never drops the other series of a step cut
    at the page boundary: a partial last step is left to the next page, and a single step
    with more than ``limit`` values is returned whole. Another user's job raises
    :class:`~metaserve.service.exceptions.JobNotFound`.

    A read-only autocommit read: no BEGIN and COMMIT round trips around it. On PostgreSQL
    (READ COMMITTED) each statement had its own snapshot inside a transaction too; values
    are only ever added, and a page's whole steps come from one statement.
    """
    filters = {"by_name": name is not None, "own": not owner.is_admin}
    parameters = {"job_id": job_id, "owner_id": owner.id, "name": name,
                  "since_step": since_step, "limit": limit + 1}
    with session.begin():
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        rows = session.execute(_metrics_statement(**filters, after=since_step is not None,
                                                  one_step=False), parameters).all()
        if not rows:  # none yet, or no such job of the caller's: which one
            job_store.get_job_row(session=session, job_id=job_id, owner=owner)
            return rows, None
        if len(rows) <= limit:
            return rows, None
        page, last_step = rows[:limit], rows[limit - 1].step
        if rows[limit].step == last_step:  # the page would cut a step in two
            page = [row for row in page if row.step < last_step]
            if not page:
                page = session.execute(_metrics_statement(**filters, after=False, one_step=True),
                                       {**parameters, "step": last_step}).all()
        return page, page[-1].step


def list_job_artifacts(*, session: Session, job_id: str, owner: User) -> list[Artifact]:
    """The artifacts of ``owner``'s job ``job_id`` by name (another user's job: JobNotFound)."""
    with session.begin():
        job_store.get_job(session=session, job_id=job_id, owner=owner)
        return job_store.list_artifacts(session=session, job_id=job_id)


def get_artifact(*, session: Session, job_id: str, owner: User, name: str) -> Artifact:
    """The artifact record ``name`` of ``owner``'s job; raises
    :class:`~metaserve.service.exceptions.ArtifactNotFound` when the job has no artifact of that name
    (compared in Python, so any client string is harmless) and JobNotFound for another
    user's job."""
    for artifact in list_job_artifacts(session=session, job_id=job_id, owner=owner):
        if artifact.name == name:
            return artifact
    raise ArtifactNotFound(job_id=job_id, name=name)


# --------------------------------------------------------------------------- why a job waits


DISPATCHER_SETTING = "METASERVE_DISPATCHER"
CONCURRENCY_SETTING = "METASERVE_DISPATCHER_CONCURRENCY"


def waiting_reason(*, embedded: bool, running: int, concurrency: int, ray_ready: bool,
                   store_error: str | None) -> str:
    """What a queued job without a stored reason waits for, as this server sees it; computed
    on read. The reasons a dispatcher writes itself stay on the row and are shown instead:
    the running-jobs quota (``waiting: ... METASERVE_MAX_RUNNING_JOBS_PER_USER``) and
    placement (a job the cluster could not place yet, released back to the queue)."""
    if store_error is not None:
        return f"waiting for the artifact store: {store_error}"
    if not embedded:
        return (f"waiting for a dispatcher: this server runs none ({DISPATCHER_SETTING}=false); "
                "a `metaserve dispatcher` process claims it")
    if not ray_ready:
        return "waiting for the embedded dispatcher to connect to Ray"
    if running >= concurrency:
        return (f"waiting for a slot: {running} of {concurrency} running on the embedded "
                f"dispatcher ({CONCURRENCY_SETTING})")
    return "waiting to be claimed by the embedded dispatcher"


def outcome(status: str, message: str | None) -> str | None:
    """How a job ended: its terminal status, or ``stopped`` for a sweep trial its scheduler
    (ASHA) stopped early (stored as ``cancelled`` with a message saying so: it ended with a
    result, not by a cancel). None while it has not ended."""
    if status not in job_store.TERMINAL:
        return None
    if status == "cancelled" and (message or "").startswith(STOPPED_EARLY):
        return "stopped"
    return status
