"""Jobs a job starts (a sweep's trials): never queued, never leased, written only by the
dispatcher holding the starting job's lease, the guard of every statement here. A starting
job that ends ends those still running in the same transaction
(:func:`metaserve.service.job_store.record_status`). Functions never commit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, insert, select
from sqlalchemy.orm import Session

from metaserve.service.exceptions import InvalidTransition, LeaseLost
from metaserve.service.job_store import ACTIVE, guarded_update, record_status, spec_hash
from metaserve.service.orm import Job, JobStatus, JobStatusEvent, Sweep, utcnow
from metaserve.workers.spec import JobSpec

_PARENT = Job.__table__.alias("parent")


def _held_sweep(parent_job_id: str, worker_id: str, *columns: Any) -> Select:
    """The sweep that ``parent_job_id`` drives, while ``worker_id`` holds its lease (no row
    otherwise)."""
    return (select(*(columns or (Sweep.id,))).join(_PARENT, _PARENT.c.id == Sweep.driver_job_id)
            .where(_PARENT.c.id == parent_job_id, _PARENT.c.lease_owner == worker_id,
                   _PARENT.c.status.in_(ACTIVE)))


def _running_child(job_id: str, parent_job_id: str, worker_id: str):  # noqa: ANN202
    """The UPDATE of ``job_id`` while it runs and ``parent_job_id``, which started it, is held
    by ``worker_id``."""
    held = _held_sweep(parent_job_id, worker_id).scalar_subquery()
    return guarded_update(job_id, Job.sweep_id == held, Job.status.in_(ACTIVE))


def start_child_job(*, session: Session, parent_job_id: str, worker_id: str, job_id: str,
                    key: str, name: str, spec: JobSpec) -> None:
    """A job that ``parent_job_id`` starts (its sweep's trial ``key``) runs: its row is
    inserted ``running`` at attempt 1, or, started by an earlier attempt of the parent and
    still running, its attempt counted; a terminal one stays as it is."""
    sweep = session.execute(_held_sweep(parent_job_id, worker_id, Sweep.id, Sweep.owner_id)
                            ).one_or_none()
    if sweep is None:
        raise LeaseLost(job_id=parent_job_id, worker_id=worker_id)
    sweep_id = sweep.id
    if session.get(Job, job_id, populate_existing=True) is None:
        now = utcnow()
        document = spec.model_dump(mode="json")
        message = f"trial {key} started"
        session.execute(insert(Job.__table__), dict(
            id=job_id, owner_id=sweep.owner_id, name=name, spec=document,
            spec_hash=spec_hash(document), status=JobStatus.RUNNING.value, attempt=1,
            max_attempts=spec.max_attempts, progress={}, created_at=now, updated_at=now,
            started_at=now, sweep_id=sweep_id, trial_id=key, message=message))
        session.execute(insert(JobStatusEvent.__table__), dict(
            job_id=job_id, status=JobStatus.RUNNING.value, attempt=1, created_at=now,
            message=message))
        return
    # running stays running; cancelling stays cancelling (its owner asked: it stops again)
    result = session.execute(
        guarded_update(job_id, Job.sweep_id == sweep_id, Job.status.in_(ACTIVE))
        .values(attempt=Job.attempt + 1, message="trial resumed by the sweep's next attempt"))
    if result.rowcount == 1:
        record_status(session, job_id)


def update_child_progress(*, session: Session, parent_job_id: str, worker_id: str, job_id: str,
                          progress: dict[str, Any]) -> None:
    """The progress of a running job ``parent_job_id`` started (none once it ended)."""
    session.execute(_running_child(job_id, parent_job_id, worker_id).values(progress=progress))


def end_child_job(*, session: Session, parent_job_id: str, worker_id: str, job_id: str,
                  status: JobStatus, message: str, error: str | None = None) -> None:
    """running/cancelling → a terminal ``status``, for a job ``parent_job_id`` started; a job
    that already ended keeps its end."""
    status = JobStatus(status)
    if not status.is_terminal():
        raise InvalidTransition(f"{status.value} is not a terminal status", status=status.value)
    values: dict[str, Any] = dict(status=status.value, finished_at=utcnow(), message=message)
    if error is not None:
        values["error"] = error
    result = session.execute(_running_child(job_id, parent_job_id, worker_id).values(**values))
    if result.rowcount == 1:
        record_status(session, job_id)


def cancelling_children(*, session: Session, parent_job_id: str) -> list[str]:
    """The jobs ``parent_job_id`` started whose owner asked to stop them (``POST
    /v1/jobs/{trial}/cancel``)."""
    return list(session.scalars(select(Job.id).where(
        Job.sweep_id == select(Sweep.id).where(Sweep.driver_job_id == parent_job_id)
        .scalar_subquery(), Job.status == JobStatus.CANCELLING.value)))
