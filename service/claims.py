"""The fair claim: which queued job a dispatcher runs next, taken atomically, fairly across
users and never above a user's running cap; and the recovery of jobs whose lease expired.

PostgreSQL locks the candidate with ``FOR UPDATE SKIP LOCKED``; SQLite (which renders no
``FOR UPDATE``) relies on a compare-and-set ``UPDATE`` checked by rowcount. Every write is a
guarded transition of :mod:`metaserve.service.job_store`. Functions never commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Integer, Row, bindparam, case, func, literal, null, or_, select, update
from sqlalchemy.orm import Session

from metaserve.service.job_store import (ACTIVE, CLAIM_RETRIES, db_now, guarded_update,
                                         record_status)
from metaserve.service.orm import Job, JobStatus, Sweep, User, utcnow

RUNNING_CAP_SETTING = "METASERVE_MAX_RUNNING_JOBS_PER_USER"
UNCAPPED = 2**31 - 1
WAITING = "waiting: "


def claim_next_job(*, session: Session, worker_id: str, lease_s: float,
                   exclude: Sequence[str] = (), max_running_per_user: int = 0) -> Job | None:
    """Atomically claim the next claimable job for ``worker_id``, fairly across users; or None.

    First a job whose lease expired (``running``/``cancelling``, oldest first): it already
    counts as running for its owner, so it is recovered before any queued job. A lapsed
    lease is no fault of the job (its dispatcher, node or database was lost): the reclaim
    counts an interruption, not an attempt. A reclaimed ``cancelling`` job becomes
    ``cancelled`` and is skipped, and the next is tried. Lease times are the database's
    clock (:func:`~metaserve.service.job_store.db_now`).

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
            select(Job.id, Job.status, Job.attempt, Job.interruptions)
            .where(Job.status.in_(ACTIVE), Job.lease_expires_at < db_now(session),
                   Job.sweep_id.is_(None),
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
            weight = session.execute(_CLAIM_WEIGHT, {"job_id": job_id, "cap": max_running_per_user}
                                     ).scalar_one()
            guard.append(_running_count(owner_id, max_running_per_user) + weight
                         <= max_running_per_user)
        result = session.execute(guarded_update(job_id, *guard).values(
            status=JobStatus.RUNNING.value, lease_owner=worker_id,
            lease_expires_at=db_now(session, lease_s), attempt=Job.attempt + 1,
            started_at=func.coalesce(Job.started_at, now),
            message=case((Job.message.startswith(WAITING), null()), else_=Job.message)))
        if result.rowcount == 1:
            return record_status(session, job_id)
        # Another claimer won this row (SQLite compare-and-set), or the owner reached the cap
        # meanwhile, or this job needs more of the cap than is left (a sweep's driver): order
        # the users again without it, so it does not hold up every job behind it.
        exclude = [*exclude, job_id]
        not_excluded = _not_in(Job.__table__, exclude)
    return None


def _reclaim(session: Session, candidate: Row, worker_id: str, lease_s: float,
             now: datetime) -> Job | None:
    """Take over a job whose lease expired; the job if it runs again, else None.

    The attempt goes on (its number is kept: the job did not fail) and ``interruptions``
    counts the handback; the stale holder's writes are fenced by ``lease_owner`` (a dispatcher
    never reclaims a job it still supervises: it passes those in ``exclude``)."""
    guard = (Job.status == candidate.status, Job.attempt == candidate.attempt,
             Job.interruptions == candidate.interruptions,
             Job.status.in_(ACTIVE), Job.lease_expires_at < db_now(session))
    if candidate.status == JobStatus.CANCELLING.value:
        values: dict[str, Any] = dict(
            status=JobStatus.CANCELLED.value, finished_at=now, lease_owner=None,
            lease_expires_at=None, message="cancelled (its lease expired while cancelling)")
    else:
        values = dict(
            status=JobStatus.RUNNING.value, lease_owner=worker_id,
            lease_expires_at=db_now(session, lease_s), interruptions=Job.interruptions + 1,
            message=f"reclaimed after the lease of attempt {candidate.attempt} expired "
                    f"(interruption {candidate.interruptions + 1}, not counted as an attempt)")
    if session.execute(guarded_update(candidate.id, *guard).values(**values)).rowcount != 1:
        return None  # another claimer won this row (SQLite compare-and-set)
    job = record_status(session, candidate.id)
    return job if values["status"] == JobStatus.RUNNING.value else None


_RUNNING = Job.__table__.alias("running_now")
_WAITING = Job.__table__.alias("waiting")
_DRIVERS = Job.__table__.alias("drivers")


def _least(first: Any, second: Any) -> Any:
    return case((first < second, first), else_=second)


def _sweep_slots(sweep: Any, cap: Any) -> Any:
    """The running-cap slots a sweep's driver job holds while it runs: itself and the trials
    it may run at once (:func:`metaserve.service.sweeps.sweep_run`: its
    ``max_concurrent_trials``, at most the cap less the driver, at least one, at most its
    trial count), never more than the whole cap (with a cap of 1 a sweep still runs: its
    driver and one trial)."""
    trials = sweep.c.config["trials"].as_integer()
    asked = func.coalesce(sweep.c.config["max_concurrent_trials"].as_integer(), cap - 1)
    concurrent = _least(_least(asked, cap - 1), trials)
    return _least(1 + case((concurrent < 1, 1), else_=concurrent), cap)


def _running_count(owner_id: int, cap: int):  # noqa: ANN202
    """The owner's share of the running cap ``cap`` (``running`` or ``cancelling`` jobs: both
    hold cluster resources), as an expression for a guard: one per job, and a sweep's driver
    the slots of the trials it may run at once (:func:`_sweep_slots`), so that the trials it
    starts later, never claimed themselves, were counted when it was claimed."""
    return _running_jobs(_RUNNING, owner_id) + _reserved_slots(owner_id, literal(cap))


def _running_jobs(table: Any, owner_id: Any):  # noqa: ANN202
    return (select(func.count()).select_from(table)
            .where(table.c.status.in_(ACTIVE), table.c.owner_id == owner_id,
                   table.c.sweep_id.is_(None))
            .scalar_subquery())


def _reserved_slots(owner_id: Any, cap: Any):  # noqa: ANN202
    """The slots the owner's running sweep drivers hold beyond their own."""
    sweeps = Sweep.__table__
    return (select(func.coalesce(func.sum(_sweep_slots(sweeps, cap) - 1), 0))
            .select_from(sweeps.join(_DRIVERS, _DRIVERS.c.id == sweeps.c.driver_job_id))
            .where(_DRIVERS.c.status.in_(ACTIVE), _DRIVERS.c.owner_id == owner_id)
            .scalar_subquery())


# The slots the job ``job_id`` takes when it is claimed: a sweep's driver its sweep's, else 1.
_CLAIM_WEIGHT = select(func.coalesce(
    select(_sweep_slots(Sweep.__table__, bindparam("cap", type_=Integer)))
    .where(Sweep.__table__.c.driver_job_id == bindparam("job_id")).scalar_subquery(), 1))


def _fair_order(session: Session, exclude: Sequence[str], cap: int) -> list[Row]:
    """Every user with a queued job: ``(owner_id, name, is_admin, running, head)`` in claim
    order — fewest running jobs, then the earliest turn (``last_claimed_at``, never first),
    then the oldest queued job (``head``; ids grow with time).

    The users come from a recursive walk of the index ``ix_jobs_status_owner_id_id`` (the
    next owner_id above the last one with a queued job: one index probe each), and each
    user's running count and oldest queued job are index probes too, so the cost grows with
    the number of users with queued jobs, not with the queue: an aggregate over all queued
    jobs took 8 ms with 10,000 of them on PostgreSQL, this 2 ms (docs/RELIABILITY.md)."""
    cap = cap or UNCAPPED  # without a cap a sweep's driver still counts its trials in the order
    if exclude:
        return list(session.execute(_FAIR_ORDER_EXCLUDING, {"exclude": list(exclude), "cap": cap}))
    return list(session.execute(_FAIR_ORDER, {"cap": cap}))


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
    jobs_running = (_running_jobs(running, owners.c.owner_id)
                    + _reserved_slots(owners.c.owner_id, bindparam("cap", type_=Integer))).label("running")
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
    owners = _fair_order(session, exclude, max_running_per_user)
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
