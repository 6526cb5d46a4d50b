"""The job store: SQL and nothing else.

Every transition is guarded in its ``WHERE`` clause and raises a :class:`MetaserveError`
subclass when no row matched. Functions never commit; :mod:`metaserve.service.jobs` owns transactions.
Claiming is atomic: PostgreSQL locks the candidate with ``FOR UPDATE SKIP LOCKED``; SQLite
(which renders no ``FOR UPDATE``) relies on a compare-and-set ``UPDATE`` checked by rowcount.
"""

from __future__ import annotations

import base64
import binascii
import math
from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import Row, bindparam, case, func, insert, null, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from metaserve.service.exceptions import (IdempotencyConflict, InvalidCursor, InvalidTransition,
                                          JobNotFound, LeaseLost, MetaserveError, QuotaExceeded)
from metaserve.service.db import UNICODE_LOWER
from metaserve.service.ids import new_id
from metaserve.service.orm import Artifact, Job, JobStatus, JobStatusEvent, Metric, User, utcnow

MAX_PAGE = 100
MAX_METRICS_PAGE = 10_000
CLAIM_RETRIES = 50
ACTIVE = (JobStatus.RUNNING.value, JobStatus.CANCELLING.value)
QUEUED_CAP_SETTING = "METASERVE_MAX_QUEUED_JOBS_PER_USER"
RUNNING_CAP_SETTING = "METASERVE_MAX_RUNNING_JOBS_PER_USER"
WAITING = "waiting: "
# PostgreSQL advisory lock space (first key) of a user's submits: the queued-cap check.
SUBMIT_LOCK = 0x6D73  # "ms"


def _update(job_id: str, *where: Any):  # noqa: ANN202
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


def _record_status(session: Session, job_id: str) -> Job:
    """Append the job's current status to its history (same transaction as the change)."""
    job = _reload(session, job_id)
    session.add(JobStatusEvent(job_id=job.id, status=job.status, attempt=job.attempt,
                               message=job.message, error=job.error))
    session.flush()
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
        _lock_owner_submits(session, owner.id)
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


def _lock_owner_submits(session: Session, owner_id: int) -> None:
    """Order this owner's submits until the transaction ends. PostgreSQL: an advisory lock
    (no row is written). SQLite: a write that changes nothing takes the database's write lock
    now, and opens the transaction, so the Idempotency-Key's SAVEPOINT nests in it (pysqlite
    starts none before a SAVEPOINT, whose RELEASE would then commit the job before the count)
    and a rejected job is rolled back."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:space, :owner_id)"),
                        {"space": SUBMIT_LOCK, "owner_id": owner_id})
    else:
        users = User.__table__
        session.execute(update(users).where(users.c.id == owner_id)
                        .values(last_claimed_at=users.c.last_claimed_at))


def _create_job(session: Session, owner: User, name: str, spec: dict[str, Any],
                spec_hash: str, max_attempts: int,
                idempotency_key: str | None) -> tuple[Job, bool]:
    now = utcnow()
    values = dict(id=new_id(), owner_id=owner.id, name=name, spec=spec, spec_hash=spec_hash,
                  status=JobStatus.QUEUED.value, attempt=0, max_attempts=max_attempts,
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


def list_jobs(
    *,
    session: Session,
    owner: User,
    status: JobStatus | None = None,
    cursor: str | None = None,
    limit: int = 50,
    sweep_id: str | None = None,
    name: str | None = None,
) -> tuple[list[Job], str | None]:
    """A page of jobs newest first and the cursor of the next page (None on the last);
    ``sweep_id``: that sweep's trials only; ``name``: jobs whose name contains it, in any
    case (``%`` and ``_`` are literal)."""
    limit = max(1, min(limit, MAX_PAGE))
    query = select(Job).order_by(Job.id.desc()).limit(limit + 1)
    if not owner.is_admin:
        query = query.where(Job.owner_id == owner.id)
    if status is not None:
        query = query.where(Job.status == JobStatus(status).value)
    if cursor is not None:
        query = query.where(Job.id < decode_cursor(cursor))
    if sweep_id is not None:
        query = query.where(Job.sweep_id == sweep_id)
    if name is not None:
        lower = (getattr(func, UNICODE_LOWER) if session.get_bind().dialect.name == "sqlite"
                 else func.lower)
        query = query.where(lower(Job.name).contains(name.lower(), autoescape=True))
    jobs = list(session.scalars(query))
    if len(jobs) > limit:
        return jobs[:limit], encode_cursor(jobs[limit - 1].id)
    return jobs, None


def request_cancel(*, session: Session, job_id: str, owner: User) -> Job:
    """queued → cancelled at once; running → cancelling; cancelling stays; terminal → 409."""
    for _ in range(CLAIM_RETRIES):
        job = get_job(session=session, job_id=job_id, owner=owner)
        status = JobStatus(job.status)
        now = utcnow()
        if status is JobStatus.QUEUED:
            result = session.execute(_update(job_id, Job.status == JobStatus.QUEUED.value).values(
                status=JobStatus.CANCELLED.value, finished_at=now, lease_owner=None,
                lease_expires_at=None, message="cancelled before it started"))
        elif status is JobStatus.RUNNING:
            result = session.execute(_update(job_id, Job.status == JobStatus.RUNNING.value).values(
                status=JobStatus.CANCELLING.value, message="cancel requested"))
        elif status is JobStatus.CANCELLING:
            return job
        else:
            raise InvalidTransition(f"job {job_id} is {status.value}; it cannot be cancelled",
                                    job_id=job_id, status=status.value)
        if result.rowcount == 1:
            return _record_status(session, job_id)
    raise InvalidTransition(f"job {job_id} kept changing state; try again", job_id=job_id)


# --------------------------------------------------------------------------- dispatcher side


def claim_next_job(*, session: Session, worker_id: str, lease_s: float,
                   exclude: Sequence[str] = (), max_running_per_user: int = 0) -> Job | None:
    """Atomically claim the next claimable job for ``worker_id``, fairly across users; or None.

    First a job whose lease expired (``running``/``cancelling``, oldest first): it already
    counts as running for its owner, so it is recovered before any queued job. A reclaimed
    ``cancelling`` job becomes ``cancelled``; a reclaim past ``max_attempts`` becomes
    ``failed`` ("gave up after N attempts: ..."); both are skipped and the next is tried.

    Then a ``queued`` job, by :func:`_fair_order`: the user with the fewest running jobs,
    then the one whose turn came longest ago (``users.last_claimed_at``, never first), then
    the one with the oldest queued job; within a user, the oldest job. With
    ``max_running_per_user`` (0: none; admins are exempt) a user running that many is
    skipped, and their queued jobs get a ``waiting: ...`` message (written once, not on
    every poll).
    Jobs in ``exclude`` (e.g. ones this dispatcher could not place a moment ago) are skipped.

    Exactly once, and never above the running cap, with any number of claimers:

    * the job row: PostgreSQL locks the candidate ``FOR UPDATE SKIP LOCKED``; SQLite (no
      row locks) relies on the compare-and-set ``UPDATE`` (status, attempt) checked by rowcount.
    * the user: on PostgreSQL the claim first locks the user's row (``FOR NO KEY UPDATE``:
      it does not block a submit's foreign-key check), so one claimer at a time claims for a
      user; a second one passes over that user to the next in the order, and waits only if
      there is none (see :func:`_next_queued`: never while holding another user, so no
      deadlock). On SQLite the first write of the claim takes the database's write lock,
      which serializes every claim.
      Under that lock the claim writes the user's turn (``last_claimed_at``) and then the
      job's guarded ``UPDATE``, which re-counts the user's running jobs: a new statement
      after the lock was granted, so under READ COMMITTED it sees every claim for that user
      committed before. (A count in the statement that waits for a lock would not do:
      PostgreSQL evaluates its subquery with the snapshot taken before the wait.)
    """
    not_excluded = _not_in(Job.__table__, exclude)
    locked_owners: set[int] = set()  # PostgreSQL: users this transaction holds
    for _ in range(CLAIM_RETRIES):
        now = utcnow()
        expired = session.execute(
            select(Job.id, Job.status, Job.attempt, Job.max_attempts, Job.error)
            .where(Job.status.in_(ACTIVE), Job.lease_expires_at < now, Job.sweep_id.is_(None),
                   *not_excluded)
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).one_or_none()
        if expired is not None:
            job = _reclaim(session, expired, worker_id, lease_s, now)
            if job is not None:
                return job
            continue  # lost the race, or the job ended (cancelled, failed): the next one
        candidate = _next_queued(session, exclude, max_running_per_user, locked_owners)
        if candidate is None:
            return None
        owner, job_id, attempt = candidate
        owner_id = owner.owner_id
        session.execute(update(User.__table__).where(User.__table__.c.id == owner_id)
                        .values(last_claimed_at=now))
        guard = [Job.status == JobStatus.QUEUED.value, Job.attempt == attempt]
        if max_running_per_user and not owner.is_admin:
            guard.append(_running_count(owner_id) < max_running_per_user)
        result = session.execute(_update(job_id, *guard).values(
            status=JobStatus.RUNNING.value, lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s), attempt=Job.attempt + 1,
            started_at=func.coalesce(Job.started_at, now),
            message=case((Job.message.startswith(WAITING), null()), else_=Job.message)))
        if result.rowcount == 1:
            return _record_status(session, job_id)
        # Another claimer won this row (SQLite compare-and-set) or the owner reached the cap
        # meanwhile: order the users again.
    return None


def _reclaim(session: Session, candidate: Row, worker_id: str, lease_s: float,
             now: datetime) -> Job | None:
    """Take over a job whose lease expired; the job if it runs again, else None."""
    guard = (Job.status == candidate.status, Job.attempt == candidate.attempt,
             Job.status.in_(ACTIVE), Job.lease_expires_at < now)
    if candidate.status == JobStatus.CANCELLING.value:
        values: dict[str, Any] = dict(
            status=JobStatus.CANCELLED.value, finished_at=now, lease_owner=None,
            lease_expires_at=None, message="cancelled (its lease expired while cancelling)")
    elif candidate.attempt >= candidate.max_attempts:
        values = dict(
            status=JobStatus.FAILED.value, finished_at=now, lease_owner=None,
            lease_expires_at=None,
            error=f"gave up after {candidate.attempt} attempts: "
                  f"{candidate.error or 'lease expired'}")
    else:
        values = dict(
            status=JobStatus.RUNNING.value, lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s), attempt=Job.attempt + 1,
            message=f"reclaimed after the lease of attempt {candidate.attempt} expired")
    if session.execute(_update(candidate.id, *guard).values(**values)).rowcount != 1:
        return None  # another claimer won this row (SQLite compare-and-set)
    job = _record_status(session, candidate.id)
    return job if values["status"] == JobStatus.RUNNING.value else None


_RUNNING = Job.__table__.alias("running_now")
_WAITING = Job.__table__.alias("waiting")


def _running_count(owner_id: int):  # noqa: ANN202
    """The owner's running jobs (``running`` or ``cancelling``: both hold cluster resources),
    as a subquery for a guard."""
    return (select(func.count()).select_from(_RUNNING)
            .where(_RUNNING.c.status.in_(ACTIVE), _RUNNING.c.owner_id == owner_id)
            .scalar_subquery())


def _fair_order(session: Session, exclude: Sequence[str]) -> list[Row]:
    """Every user with a queued job: ``(owner_id, name, is_admin, running, head)`` in claim
    order — fewest running jobs, then the earliest turn (``last_claimed_at``, never first),
    then the oldest queued job (``head``; ids grow with time).

    The users come from a recursive walk of the index ``ix_jobs_status_owner_id_id`` (the
    next owner_id above the last one with a queued job: one index probe each), and each
    user's running count and oldest queued job are index probes too, so the cost grows with
    the number of users with queued jobs, not with the queue: an aggregate over all queued
    jobs took 8 ms with 10,000 of them on PostgreSQL, this 2 ms (docs/RELIABILITY.md)."""
    if exclude:
        return list(session.execute(_FAIR_ORDER_EXCLUDING, {"exclude": list(exclude)}))
    return list(session.execute(_FAIR_ORDER))


def _build_fair_order(excluding: bool):  # noqa: ANN202
    table = Job.__table__
    first, step, queued, running = (table.alias(name) for name in (
        "first_owner", "next_owner", "queued", "running"))

    def not_excluded(alias: Any) -> tuple[Any, ...]:
        return (alias.c.id.not_in(bindparam("exclude", expanding=True)),) if excluding else ()

    owners = (select(func.min(first.c.owner_id).label("owner_id"))
              .where(first.c.status == JobStatus.QUEUED.value, *not_excluded(first))
              .cte("owners", recursive=True))
    owners = owners.union_all(
        select(select(func.min(step.c.owner_id))
               .where(step.c.status == JobStatus.QUEUED.value,
                      step.c.owner_id > owners.c.owner_id, *not_excluded(step))
               .scalar_subquery())
        .where(owners.c.owner_id.is_not(None)))
    jobs_running = (select(func.count()).select_from(running)
                    .where(running.c.status.in_(ACTIVE), running.c.owner_id == owners.c.owner_id)
                    .scalar_subquery().label("running"))
    head = (select(func.min(queued.c.id))
            .where(queued.c.status == JobStatus.QUEUED.value,
                   queued.c.owner_id == owners.c.owner_id, *not_excluded(queued))
            .scalar_subquery().label("head"))
    return (select(owners.c.owner_id, User.name, User.is_admin, jobs_running, head)
            .join(User, User.id == owners.c.owner_id)
            .order_by(jobs_running, User.last_claimed_at.asc().nulls_first(), head))


# Built once, as _JOB_ROW: this statement's construction and cache key cost more than running it.
_FAIR_ORDER = _build_fair_order(excluding=False)
_FAIR_ORDER_EXCLUDING = _build_fair_order(excluding=True)


def _not_in(table: Any, exclude: Sequence[str]) -> tuple[Any, ...]:
    return (table.c.id.not_in(list(exclude)),) if exclude else ()


def _next_queued(session: Session, exclude: Sequence[str], max_running_per_user: int,
                 locked_owners: set[int]) -> tuple[Row, str, int] | None:
    """``(owner row of _fair_order, job_id, attempt)`` of the queued job to claim next, its
    owner and itself row-locked on PostgreSQL; None when there is none.

    Owners are locked SKIP LOCKED (another claimer holds one: the next in the order is
    tried). Only when every one was held, and this transaction holds no owner yet
    (``locked_owners``, kept across the claim's retries), does it wait for the first: a
    claimer holding one owner never waits for another, so two claimers cannot deadlock, and
    one busy user does not make a second claimer come back empty."""
    owners = _fair_order(session, exclude)
    if max_running_per_user:
        at_cap = [owner for owner in owners
                  if owner.running >= max_running_per_user and not owner.is_admin]
        if at_cap:
            _mark_waiting(session, at_cap, max_running_per_user)
        owners = [owner for owner in owners if owner not in at_cap]
    lock_owners = session.get_bind().dialect.name == "postgresql"  # SQLite: the write lock
    held_elsewhere: list[Row] = []
    for owner in owners:
        if lock_owners and owner.owner_id not in locked_owners:
            if session.execute(_LOCK_OWNER_NOWAIT, {"owner_id": owner.owner_id}
                               ).one_or_none() is None:
                held_elsewhere.append(owner)
                continue
            locked_owners.add(owner.owner_id)
        if (head := _head(session, owner.owner_id, exclude)) is not None:
            return owner, head.id, head.attempt
    if held_elsewhere and not locked_owners:
        owner = held_elsewhere[0]
        session.execute(_LOCK_OWNER, {"owner_id": owner.owner_id})
        locked_owners.add(owner.owner_id)
        if (head := _head(session, owner.owner_id, exclude)) is not None:
            return owner, head.id, head.attempt
    return None


def _head(session: Session, owner_id: int, exclude: Sequence[str]) -> Row | None:
    """The owner's oldest queued job (not one another transaction holds)."""
    if exclude:
        return session.execute(_HEAD_EXCLUDING, {"owner_id": owner_id, "exclude": list(exclude)}
                               ).one_or_none()
    return session.execute(_HEAD, {"owner_id": owner_id}).one_or_none()


# A sweep's trial (sweep_id set) is never claimed: its sweep's driver job runs it.
_HEAD = (select(Job.id, Job.attempt)
         .where(Job.status == JobStatus.QUEUED.value, Job.owner_id == bindparam("owner_id"),
                Job.sweep_id.is_(None))
         .order_by(Job.id).limit(1).with_for_update(skip_locked=True))
_HEAD_EXCLUDING = _HEAD.where(Job.id.not_in(bindparam("exclude", expanding=True)))


# FOR NO KEY UPDATE: a submit's foreign-key check (FOR KEY SHARE) on the user is not blocked.
_LOCK_OWNER = (select(User.__table__.c.id).where(User.__table__.c.id == bindparam("owner_id"))
               .with_for_update(key_share=True))
_LOCK_OWNER_NOWAIT = _LOCK_OWNER.with_for_update(skip_locked=True, key_share=True)


def waiting_message(owner_name: str, max_running_per_user: int) -> str:
    return (f"{WAITING}{owner_name} already runs {max_running_per_user} jobs "
            f"({RUNNING_CAP_SETTING})")


_MARK_WAITING = (
    update(Job.__table__)
    .where(Job.__table__.c.id.in_(
        select(_WAITING.c.id)
        .where(_WAITING.c.status == JobStatus.QUEUED.value,
               _WAITING.c.owner_id == bindparam("owner"),
               or_(_WAITING.c.message.is_(None), _WAITING.c.message != bindparam("text")))
        .with_for_update(skip_locked=True)))
    .values(message=bindparam("text"))
)


def _mark_waiting(session: Session, owners: Sequence[Row], max_running_per_user: int) -> None:
    """Say why the queued jobs of users at the running cap wait. Only rows whose message
    differs are written, so a job is written once while it waits, not on every poll; rows
    another transaction holds are skipped (SKIP LOCKED: no waits, no deadlock between two
    claimers marking the same user), the next poll writes them."""
    session.execute(_MARK_WAITING, [
        {"owner": owner.owner_id, "text": waiting_message(owner.name, max_running_per_user)}
        for owner in owners])


def expire_leases(*, session: Session, worker_id: str) -> int:
    """Expire every lease held by ``worker_id`` (a dispatcher restarting under the identity
    of its previous life: those jobs lost their runner), so they can be reclaimed now."""
    result = session.execute(
        update(Job)
        .where(Job.lease_owner == worker_id, Job.status.in_(ACTIVE))
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        .execution_options(synchronize_session=False))
    return result.rowcount


def _holding(job_id: str, worker_id: str, statuses: Sequence[str] = ACTIVE):  # noqa: ANN202
    return _update(job_id, Job.lease_owner == worker_id, Job.status.in_(statuses))


def job_status(*, session: Session, job_id: str) -> str:
    """The job's status (a cheap read for the dispatcher's watch)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise JobNotFound(job_id=job_id)
    return status


def renew_lease(*, session: Session, job_id: str, worker_id: str, lease_s: float) -> Job:
    """Extend the lease; the returned row shows whether a cancel was requested."""
    result = session.execute(_holding(job_id, worker_id).values(
        lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
    if result.rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)
    return _reload(session, job_id)


def update_progress(*, session: Session, job_id: str, worker_id: str, progress: dict[str, Any],
                    message: str | None = None) -> None:
    values: dict[str, Any] = {"progress": progress}
    if message is not None:
        values["message"] = message
    if session.execute(_holding(job_id, worker_id).values(**values)).rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)


def release_job(*, session: Session, job_id: str, worker_id: str, message: str) -> None:
    """running → queued without counting the attempt (e.g. the cluster cannot place it yet)."""
    result = session.execute(_holding(job_id, worker_id, (JobStatus.RUNNING.value,)).values(
        status=JobStatus.QUEUED.value, attempt=Job.attempt - 1, lease_owner=None,
        lease_expires_at=None, message=message))
    if result.rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)
    _record_status(session, job_id)


def finish_job(*, session: Session, job_id: str, worker_id: str, status: JobStatus,
               error: str | None = None) -> None:
    """running/cancelling → a terminal status, only by the lease owner."""
    status = JobStatus(status)
    if not status.is_terminal():
        raise InvalidTransition(f"{status.value} is not a terminal status", status=status.value)
    values: dict[str, Any] = dict(status=status.value, finished_at=utcnow(), lease_owner=None,
                                  lease_expires_at=None)
    if error is not None:
        values["error"] = error
    if session.execute(_holding(job_id, worker_id).values(**values)).rowcount != 1:
        raise LeaseLost(job_id=job_id, worker_id=worker_id)
    _record_status(session, job_id)


def fail_attempt(*, session: Session, job_id: str, worker_id: str, error: str,
                 retry: bool = True) -> None:
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
        result = session.execute(
            _update(job_id, Job.lease_owner == worker_id, *where).values(**cleared, **values))
        if result.rowcount == 1:
            _record_status(session, job_id)
            return
    raise LeaseLost(job_id=job_id, worker_id=worker_id)


# --------------------------------------------------------------------------- metrics, artifacts


def add_metrics(*, session: Session, job_id: str, rows: Sequence[tuple[int, str, float]]) -> int:
    """Insert ``(step, name, value)`` rows; rows whose (job, name, step) exists are ignored,
    a non-finite value (NaN, ±inf) is stored as NULL. Returns the number of rows inserted."""
    if not rows:
        return 0
    now = utcnow()
    insert = _dialect_insert(session)
    statement = insert(Metric).values([
        {"job_id": job_id, "step": int(step), "name": name,
         "value": float(value) if math.isfinite(value) else None, "created_at": now}
        for step, name, value in rows
    ]).on_conflict_do_nothing(index_elements=["job_id", "name", "step"]).returning(Metric.id)
    return len(session.execute(statement).all())


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
