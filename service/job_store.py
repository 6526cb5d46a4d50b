"""The job store: SQL and nothing else.

Job rows and their transitions, leases, metrics and artifact records (the claim, which picks
the next job fairly, is :mod:`metaserve.service.claims`). Every transition is guarded in its
``WHERE`` clause and raises a :class:`MetaserveError` subclass when no row matched; the
status history is appended in the same transaction (:func:`record_status`), the one writer of
a job's status. Functions never commit: their callers own the transaction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Any, Sequence

from sqlalchemy import Row, bindparam, func, insert, literal, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from metaserve.service.exceptions import (IdempotencyConflict, InvalidCursor, InvalidTransition,
                                          JobNotFound, LeaseLost, MetaserveError, QuotaExceeded)
from metaserve.service.ids import new_id
from metaserve.service.orm import (Artifact, Job, JobStatus, JobStatusEvent, Metric, Sweep, User,
                                   utcnow)
from metaserve.workers.spec import JobSpec

MAX_PAGE = 100
MAX_METRICS_PAGE = 10_000
CLAIM_RETRIES = 50
ACTIVE = (JobStatus.RUNNING.value, JobStatus.CANCELLING.value)
TERMINAL = tuple(status.value for status in JobStatus if status.is_terminal())
QUEUED_CAP_SETTING = "METASERVE_MAX_QUEUED_JOBS_PER_USER"
# PostgreSQL advisory lock space (first key) of a user's submits: the queued-cap check.
SUBMIT_LOCK = 0x6D73  # "ms"


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of a spec (or a sweep's
    config): what an Idempotency-Key's replay is compared by."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def job_spec(row: Any) -> JobSpec:
    """The typed spec of a job's row (a :class:`Job` or a row of its columns): the one place a
    stored spec is parsed. Stored specs were validated and canonicalized when submitted."""
    return JobSpec.model_validate(row.spec)


def guarded_update(job_id: str, *where: Any):  # noqa: ANN202 - an UPDATE statement
    """``UPDATE jobs ... WHERE id = job_id AND <where>``: a transition guarded in its WHERE
    clause (its rowcount says whether it happened)."""
    return (
        update(Job)
        .where(Job.id == job_id, *where)
        .execution_options(synchronize_session=False)
    )


def _reload(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(job_id=job_id)
    return job


def record_status(session: Session, job_id: str) -> Job:
    """Append the job's current status to its history (same transaction as the change). A
    job that became terminal ends the jobs it started that still run (a sweep's trials)."""
    job = _reload(session, job_id)
    session.add(JobStatusEvent(job_id=job.id, status=job.status, attempt=job.attempt,
                               message=job.message, error=job.error))
    session.flush()
    if job.status in TERMINAL:
        _end_children(session, job)
    return job


def _dialect_insert(session: Session):  # noqa: ANN202
    name = session.get_bind().dialect.name
    return postgresql.insert if name == "postgresql" else sqlite.insert


# --------------------------------------------------------------------------- users


def create_user(*, session: Session, name: str, key_hash: str, is_admin: bool = False) -> User:
    user = User(name=name, key_hash=key_hash, is_admin=is_admin)
    session.add(user)
    session.flush()
    return user


def get_user_by_key_hash(*, session: Session, key_hash: str) -> User | None:
    return session.scalars(select(User).where(User.key_hash == key_hash)).one_or_none()


def count_users(*, session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User)) or 0


# --------------------------------------------------------------------------- client side


def create_job(
    *,
    session: Session,
    owner: User,
    name: str,
    spec: dict[str, Any],
    spec_hash: str,
    max_attempts: int,
    idempotency_key: str | None = None,
    max_queued: int = 0,
    retry_after_s: int = 60,
) -> tuple[Job, bool]:
    """Insert a queued job; returns ``(job, created)``.

    With an idempotency key already used by this owner: the same ``spec_hash`` returns
    the existing job (``created`` False), another one raises :class:`IdempotencyConflict`.
    The insert comes first (the common case: a new key) and the key's unique constraint
    decides a race; the job row and its first status event are two plain INSERTs, and the
    job returned is built from the values written, so a submit reads nothing back.

    ``max_queued`` (0: none; admins: none): a job that would make the owner's queued jobs
    more than that raises :class:`QuotaExceeded` (the caller rolls back: nothing is stored);
    a replay is answered before the count, so it still returns its job.
    """
    if owner.is_admin:
        max_queued = 0  # operators' keys are exempt (settings.py says why)
    if max_queued:
        lock_owner(session, owner.id, SUBMIT_LOCK)
    job, created = _create_job(session, owner, name, spec, spec_hash, max_attempts,
                               idempotency_key)
    if created and max_queued:
        # Counted after the insert, under the lock that orders this owner's submits: no
        # other submit of the owner commits between insert and count, so concurrent submits
        # cannot pass the cap together.
        queued = session.scalar(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.QUEUED.value, Job.owner_id == owner.id)) or 0
        if queued > max_queued:
            raise QuotaExceeded(
                f"{owner.name} has {queued - 1} queued jobs, the most {QUEUED_CAP_SETTING} "
                f"allows; submit again when one has started", retry_after_s=retry_after_s,
                limit=QUEUED_CAP_SETTING, count=queued - 1, cap=max_queued)
    return job, created


def lock_owner(session: Session, owner_id: int, space: int) -> None:
    """Order this owner's writes of one kind (``space``: SUBMIT_LOCK for submits, the dataset
    store's for uploads) until the transaction ends. PostgreSQL: an advisory lock
    (no row is written). SQLite: a write that changes nothing takes the database's write lock
    now, and opens the transaction, so the Idempotency-Key's SAVEPOINT nests in it (pysqlite
    starts none before a SAVEPOINT, whose RELEASE would then commit the job before the count)
    and a rejected job is rolled back."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:space, :owner_id)"),
                        {"space": space, "owner_id": owner_id})
    else:
        users = User.__table__
        session.execute(update(users).where(users.c.id == owner_id)
                        .values(last_claimed_at=users.c.last_claimed_at))


def _create_job(session: Session, owner: User, name: str, spec: dict[str, Any],
                spec_hash: str, max_attempts: int,
                idempotency_key: str | None) -> tuple[Job, bool]:
    now = utcnow()
    values = dict(id=new_id(), owner_id=owner.id, name=name, spec=spec, spec_hash=spec_hash,
                  status=JobStatus.QUEUED.value, attempt=0, interruptions=0,
                  max_attempts=max_attempts,
                  progress={}, idempotency_key=idempotency_key, created_at=now,
                  updated_at=now)
    event = dict(job_id=values["id"], status=JobStatus.QUEUED.value, attempt=0, created_at=now)
    if idempotency_key is None:
        _insert_job(session, values, event)
        return Job(**values), True
    try:
        with session.begin_nested():
            _insert_job(session, values, event)
    except IntegrityError:
        existing = _by_idempotency_key(session, owner.id, idempotency_key)
        if existing is None:
            raise
        return _replay(existing, spec_hash), False
    return Job(**values), True


def _insert_job(session: Session, values: dict[str, Any], event: dict[str, Any]) -> None:
    session.execute(insert(Job.__table__), values)
    session.execute(insert(JobStatusEvent.__table__), event)


def _by_idempotency_key(session: Session, owner_id: int, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key)
    ).one_or_none()


def _replay(existing: Job, spec_hash: str) -> Job:
    if existing.spec_hash != spec_hash:
        raise IdempotencyConflict(job_id=existing.id)
    return existing


def get_job(*, session: Session, job_id: str, owner: User) -> Job:
    """The job, if ``owner`` may see it (their own, or any for an admin)."""
    query = select(Job).where(Job.id == job_id)
    if not owner.is_admin:
        query = query.where(Job.owner_id == owner.id)
    job = session.scalars(query).one_or_none()
    if job is None:
        raise JobNotFound(job_id=job_id)
    return job


# Built once: constructing a statement and its cache key is most of a small query's cost.
_JOB_ROW = select(Job.__table__).where(Job.__table__.c.id == bindparam("job_id"))
_OWN_JOB_ROW = _JOB_ROW.where(Job.__table__.c.owner_id == bindparam("owner_id"))


def get_job_row(*, session: Session, job_id: str, owner: User) -> Row:
    """The job's columns as a row (attribute access like a :class:`Job`), if ``owner`` may
    see it: a plain Core query, for the status poll, which reads and never writes the job
    (a third of the cost of loading the ORM object)."""
    if owner.is_admin:
        row = session.execute(_JOB_ROW, {"job_id": job_id}).one_or_none()
    else:
        row = session.execute(_OWN_JOB_ROW, {"job_id": job_id, "owner_id": owner.id}
                              ).one_or_none()
    if row is None:
        raise JobNotFound(job_id=job_id)
    return row


def encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor(cursor=cursor) from None
    if len(job_id) != 26 or not job_id.isalnum():
        raise InvalidCursor(cursor=cursor)
    return job_id


def request_cancel(*, session: Session, job_id: str, owner: User) -> Job:
    """queued → cancelled at once; running → cancelling; cancelling stays; terminal → 409."""
    for _ in range(CLAIM_RETRIES):
        job = get_job(session=session, job_id=job_id, owner=owner)
        status = JobStatus(job.status)
        now = utcnow()
        if status is JobStatus.QUEUED:
            result = session.execute(guarded_update(job_id, Job.status == JobStatus.QUEUED.value).values(
                status=JobStatus.CANCELLED.value, finished_at=now, lease_owner=None,
                lease_expires_at=None, message="cancelled before it started"))
        elif status is JobStatus.RUNNING:
            result = session.execute(guarded_update(job_id, Job.status == JobStatus.RUNNING.value).values(
                status=JobStatus.CANCELLING.value, message="cancel requested"))
        elif status is JobStatus.CANCELLING:
            return job
        else:
            raise InvalidTransition(f"job {job_id} is {status.value}; it cannot be cancelled",
                                    job_id=job_id, status=status.value)
        if result.rowcount == 1:
            return record_status(session, job_id)
    raise InvalidTransition(f"job {job_id} kept changing state; try again", job_id=job_id)


# --------------------------------------------------------------------------- leases
# Lease times come from the database's clock, never a dispatcher's: two dispatchers whose
# clocks disagree still agree on when a lease lapses.


def db_now(session: Session, seconds: float = 0.0):  # noqa: ANN201 - a SQL expression
    """The database's current time plus ``seconds``, as a SQL expression comparable with
    (and storable in) a :class:`~metaserve.service.orm.UTCDateTime` column. PostgreSQL:
    ``statement_timestamp()`` (timestamptz). SQLite: ``strftime('%Y-%m-%d %H:%M:%f', 'now')``
    (UTC, milliseconds) padded to microseconds: the very text SQLAlchemy stores a datetime as,
    so stored and computed times compare as text correctly."""
    if session.get_bind().dialect.name == "postgresql":
        now = func.statement_timestamp()
        return now + func.make_interval(0, 0, 0, 0, 0, 0, literal(float(seconds))) \
            if seconds else now
    modifier = f"{float(seconds):+.6f} seconds"
    return func.strftime("%Y-%m-%d %H:%M:%f", "now", modifier).concat("000")


def expire_leases(*, session: Session, worker_id: str) -> int:
    """Expire every lease held by ``worker_id`` (a dispatcher restarting under the identity
    of its previous life: those jobs lost their runner), so they can be reclaimed now."""
    result = session.execute(
        update(Job)
        .where(Job.lease_owner == worker_id, Job.status.in_(ACTIVE))
        .values(lease_expires_at=db_now(session, -1.0))
        .execution_options(synchronize_session=False))
    return result.rowcount


def _holding(job_id: str, worker_id: str, statuses: Sequence[str] = ACTIVE,
             attempt: int | None = None):  # noqa: ANN202
    """A transition of the job only while ``worker_id`` holds its lease in one of
    ``statuses`` and, with ``attempt``, for that attempt: the fence of a run's writes (an
    attempt that lost its lease, even to a later attempt of the same dispatcher, writes
    nothing)."""
    where = [Job.lease_owner == worker_id, Job.status.in_(statuses)]
    if attempt is not None:
        where.append(Job.attempt == attempt)
    return guarded_update(job_id, *where)


def fence(*, session: Session, job_id: str, worker_id: str, attempt: int) -> None:
    """Guard the rest of the transaction: it writes for the attempt ``attempt`` of the job
    only while ``worker_id`` holds its lease (running or cancelling), else raises
    :class:`LeaseLost` (the caller rolls back: nothing it wrote is kept, so nothing is served).

    A guarded ``UPDATE`` that changes nothing: it row-locks the job until the transaction ends
    (PostgreSQL; SQLite: it takes the database's write lock), so a claim that would take the
    lease over waits for this transaction, and this one, if it waited for a claim, re-checks
    the guard on the claimed row and matches nothing. The rows written after it (metrics,
    artifacts, logs, a sweep's trials) are thus the lease holder's, in the same transaction."""
    guard = _holding(job_id, worker_id, attempt=attempt).values(lease_owner=Job.lease_owner)
    if session.execute(guard).rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)


def job_status(*, session: Session, job_id: str) -> str:
    """The job's status (a cheap read for the dispatcher's watch)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise JobNotFound(job_id=job_id)
    return status


def renew_lease(*, session: Session, job_id: str, worker_id: str, lease_s: float,
                attempt: int | None = None) -> Job:
    """Extend the lease (from the database's clock); the returned row shows whether a cancel
    was requested."""
    result = session.execute(_holding(job_id, worker_id, attempt=attempt).values(
        lease_expires_at=db_now(session, lease_s)))
    if result.rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)
    return _reload(session, job_id)


def renew_leases(*, session: Session, worker_id: str, attempts: dict[str, int],
                 lease_s: float) -> dict[str, str]:
    """Extend the leases of every job ``worker_id`` runs (``attempts``: job id → the attempt
    it runs) in ONE statement, from the database's clock; returns job id → status of those
    still held (one missing lost its lease; ``cancelling``: a cancel was requested)."""
    if not attempts:
        return {}
    jobs = Job.__table__
    statement = (update(jobs)
                 .where(jobs.c.lease_owner == worker_id, jobs.c.status.in_(ACTIVE),
                        tuple_(jobs.c.id, jobs.c.attempt).in_(list(attempts.items())))
                 .values(lease_expires_at=db_now(session, lease_s))
                 .returning(jobs.c.id, jobs.c.status))
    return {job_id: status for job_id, status in session.execute(statement)}


def held_statuses(*, session: Session, worker_id: str, attempts: dict[str, int]
                  ) -> dict[str, str]:
    """One read for every job ``worker_id`` runs (the dispatcher's status and cancel poll):
    job id → status of those whose lease it still holds for that attempt (a missing one
    lost it; ``cancelling``: a cancel was requested)."""
    if not attempts:
        return {}
    jobs = Job.__table__
    return {job_id: status for job_id, status in session.execute(
        select(jobs.c.id, jobs.c.status)
        .where(jobs.c.lease_owner == worker_id, jobs.c.status.in_(ACTIVE),
               tuple_(jobs.c.id, jobs.c.attempt).in_(list(attempts.items()))))}


def update_progress(*, session: Session, job_id: str, worker_id: str, progress: dict[str, Any],
                    message: str | None = None, attempt: int | None = None) -> None:
    values: dict[str, Any] = {"progress": progress}
    if message is not None:
        values["message"] = message
    if session.execute(_holding(job_id, worker_id, attempt=attempt).values(**values)
                       ).rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)


def release_job(*, session: Session, job_id: str, worker_id: str, message: str,
                attempt: int | None = None, interrupted: bool = False) -> None:
    """running → queued without counting the attempt (e.g. the cluster cannot place it yet);
    ``interrupted``: a handback that was no fault of the job (a drained dispatcher), counted
    in ``interruptions``."""
    values: dict[str, Any] = dict(
        status=JobStatus.QUEUED.value, attempt=Job.attempt - 1, lease_owner=None,
        lease_expires_at=None, message=message)
    if interrupted:
        values["interruptions"] = Job.interruptions + 1
    result = session.execute(_holding(job_id, worker_id, (JobStatus.RUNNING.value,),
                                      attempt=attempt).values(**values))
    if result.rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)
    record_status(session, job_id)


def finish_job(*, session: Session, job_id: str, worker_id: str, status: JobStatus,
               error: str | None = None, attempt: int | None = None) -> None:
    """running/cancelling → a terminal status, only by the lease owner."""
    status = JobStatus(status)
    if not status.is_terminal():
        raise InvalidTransition(f"{status.value} is not a terminal status", status=status.value)
    values: dict[str, Any] = dict(status=status.value, finished_at=utcnow(), lease_owner=None,
                                  lease_expires_at=None)
    if error is not None:
        values["error"] = error
    if session.execute(_holding(job_id, worker_id, attempt=attempt).values(**values)
                       ).rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)
    record_status(session, job_id)


def fail_attempt(*, session: Session, job_id: str, worker_id: str, error: str,
                 retry: bool = True, attempt: int | None = None) -> None:
    """This attempt failed: requeue while attempts remain and ``retry`` (the error is
    transient), else ``failed``. A job being cancelled becomes ``cancelled``."""
    now = utcnow()
    cleared = dict(lease_owner=None, lease_expires_at=None, error=error)
    requeue = ((Job.status == JobStatus.RUNNING.value, Job.attempt < Job.max_attempts),
               dict(status=JobStatus.QUEUED.value, message=f"attempt failed, will retry: {error}"))
    for where, values in (
        *((requeue,) if retry else ()),
        ((Job.status == JobStatus.RUNNING.value,),
         dict(status=JobStatus.FAILED.value, finished_at=now, message=f"failed: {error}")),
        ((Job.status == JobStatus.CANCELLING.value,),
         dict(status=JobStatus.CANCELLED.value, finished_at=now)),
    ):
        if attempt is not None:
            where = (*where, Job.attempt == attempt)
        result = session.execute(
            guarded_update(job_id, Job.lease_owner == worker_id, *where).values(**cleared, **values))
        if result.rowcount == 1:
            record_status(session, job_id)
            return
    raise LeaseLost(job_id=job_id, worker_id=worker_id)


# --------------------------------------------------------------------------- jobs a job starts
# (a sweep's trials: service/child_jobs.py writes them; a terminal parent ends them here)


def _end_children(session: Session, parent: Job) -> None:
    """End the jobs the terminal ``parent`` started that still run: with its cancel, cancelled;
    with its end, cancelled with the reason (no later attempt resumes them)."""
    if parent.sweep_id is not None:
        return  # a trial starts no jobs
    message = ("cancelled with its sweep" if parent.status == JobStatus.CANCELLED.value
               else f"the sweep {parent.status} before this trial finished")
    children = session.scalars(select(Job.id).where(
        Job.sweep_id == select(Sweep.id).where(Sweep.driver_job_id == parent.id)
        .scalar_subquery(), Job.status.in_(ACTIVE))).all()
    for job_id in children:
        result = session.execute(guarded_update(job_id, Job.status.in_(ACTIVE)).values(
            status=JobStatus.CANCELLED.value, finished_at=utcnow(), message=message))
        if result.rowcount == 1:
            record_status(session, job_id)


# --------------------------------------------------------------------------- metrics, artifacts


def add_metrics(*, session: Session, job_id: str, rows: Sequence[tuple[int, str, float]],
                replace: bool = False) -> int:
    """Insert ``(step, name, value)`` rows; rows whose (job, name, step) exists are ignored
    (``replace``: overwritten, as a fenced run's writer does: a resumed attempt's values
    replace those an earlier attempt wrote past its last checkpoint), a non-finite value
    (NaN, ±inf) is stored as NULL. Returns the number of rows inserted (or replaced)."""
    if not rows:
        return 0
    now = utcnow()
    insert = _dialect_insert(session)
    statement = insert(Metric).values([
        {"job_id": job_id, "step": int(step), "name": name,
         "value": float(value) if math.isfinite(value) else None, "created_at": now}
        for step, name, value in rows
    ])
    keys = ["job_id", "name", "step"]
    statement = (statement.on_conflict_do_update(
        index_elements=keys, set_={"value": statement.excluded.value,
                                   "created_at": statement.excluded.created_at})
        if replace else statement.on_conflict_do_nothing(index_elements=keys))
    return len(session.execute(statement.returning(Metric.id)).all())


def get_metrics(*, session: Session, job_id: str, name: str | None = None,
                since_step: int | None = None, limit: int = MAX_METRICS_PAGE) -> list[Metric]:
    """Metrics of a job ordered by (name, step); ``since_step`` is exclusive."""
    query = (select(Metric).where(Metric.job_id == job_id)
             .order_by(Metric.name, Metric.step).limit(max(1, min(limit, MAX_METRICS_PAGE))))
    if name is not None:
        query = query.where(Metric.name == name)
    if since_step is not None:
        query = query.where(Metric.step > since_step)
    return list(session.scalars(query))


def add_artifact(*, session: Session, job_id: str, name: str, size: int, sha256: str,
                 media_type: str) -> Artifact:
    """Record (or replace) the artifact ``name`` of a job."""
    insert = _dialect_insert(session)
    values = {"size": size, "sha256": sha256, "media_type": media_type, "created_at": utcnow()}
    statement = insert(Artifact).values(job_id=job_id, name=name, **values)
    session.execute(statement.on_conflict_do_update(index_elements=["job_id", "name"],
                                                    set_=values))
    artifact = session.get(Artifact, (job_id, name), populate_existing=True)
    assert artifact is not None
    return artifact


def list_artifacts(*, session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(
        select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))
