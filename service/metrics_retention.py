"""Metrics retention: a finished job's metric series downsampled to at most
``METASERVE_METRICS_MAX_POINTS_PER_SERIES`` points (about; see below), so that the metrics
table grows with the number of jobs, not with the number of steps they log.

Why downsampling, not an age. What an MLflow or W&B user expects of a finished run is that
its curves stay readable for as long as the run exists: deleting points older than an age
would empty an old job's charts wholesale (and its leaderboard value, its ``sort=metric:``
value), while the row count it saves is the same either way once a job is old. W&B draws
long histories from a sample of a few hundred to a few thousand points per series; keeping
that many evenly spaced points keeps the shape of every curve, and a user who wants every
point sets the budget to 0. The table is then bounded by jobs × series × budget, and
deleting a job (its rows cascade) is what frees the rest.

What a downsampled series keeps, of ``n`` points ordered by step, with budget ``b`` (only
when ``n > b + 3``, so a second pass at the same budget deletes nothing): every ``k``-th
point from the first, ``k = ceil(n / b)`` (at most ``b`` points, evenly spaced in steps for
a series logged at a fixed interval); the last point (what the sweep leaderboard, the
job listing's ``sort=metric:`` and a reader of "the final value" read); and the point with
the lowest and the one with the highest value (the first of each; NULL values, non-finite,
count as neither), since the store does not know whether a series is a loss or an accuracy,
keeping both keeps its best, and a chart's y-range, whichever it is.

Only terminal jobs (succeeded, failed, cancelled) are downsampled: nothing writes to them any
more (every run write is fenced by an active lease), so the pass never races a writer and
costs the hot path nothing. Each job is one transaction: it marks the job
(``jobs.metrics_kept_per_series``, migration 0014, so that the next pass skips it; the
job's ``updated_at`` is left as it was) and deletes its surplus points in one statement.
Two dispatchers' passes may meet on a job: on PostgreSQL the mark's row lock makes the
second find it done; on SQLite the writes are serialized anyway. Lowering the budget
downsamples the marked jobs again; raising it brings nothing back.

One way of running it: each dispatcher's retention thread (:func:`keep_downsampling`) runs
a pass every ``METASERVE_METRICS_RETENTION_INTERVAL_S``. Deleted rows are reused by later
inserts (PostgreSQL after autovacuum, SQLite from its free list); the files do not shrink.
The cost is measured by ``benchmarks/control_plane.py --retention`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Delete, Integer, Select, bindparam, delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from metaserve.service.orm import Job, Metric
from metaserve.service.job_store import TERMINAL

logger = logging.getLogger(__name__)

EXTRA_POINTS = 3  # kept past the budget: the last point, the lowest and the highest value
CANDIDATES_PER_READ = 100  # finished jobs found by one read of a pass


@dataclass
class RetentionPass:
    """What one pass did."""

    jobs: int = 0       # finished jobs downsampled (and marked)
    deleted: int = 0    # metric rows deleted
    seconds: float = 0.0


def _surplus() -> Delete:
    """The DELETE of one job's points past the budget (parameters ``job_id``, ``budget``):
    window functions over the job's rows, one partition per series, in both dialects."""
    m = Metric.__table__.c
    series = m.name
    ranked = select(
        m.id,
        (func.row_number().over(partition_by=series, order_by=m.step) - 1).label("rank"),
        func.count().over(partition_by=series).label("points"),
        func.row_number().over(partition_by=series,
                               order_by=(m.value.is_(None), m.value, m.step)).label("low"),
        func.row_number().over(partition_by=series,
                               order_by=(m.value.is_(None), m.value.desc(), m.step)).label("high"),
    ).where(m.job_id == bindparam("job_id")).subquery()
    budget = bindparam("budget", type_=Integer)
    stride = (ranked.c.points + budget - 1) // budget  # integer division: ceil(points / budget)
    doomed = select(ranked.c.id).where(
        ranked.c.points > budget + EXTRA_POINTS,
        ranked.c.rank % stride != 0,
        ranked.c.rank != ranked.c.points - 1,
        ranked.c.low != 1,
        ranked.c.high != 1)
    return delete(Metric).where(Metric.id.in_(doomed))


def _candidates() -> Select:
    """Finished jobs not downsampled to ``budget`` yet, after ``after`` in id order."""
    return (select(Job.id)
            .where(Job.status.in_(TERMINAL), Job.id > bindparam("after"),
                   or_(Job.metrics_kept_per_series.is_(None),
                       Job.metrics_kept_per_series > bindparam("budget", type_=Integer)))
            .order_by(Job.id).limit(CANDIDATES_PER_READ))


SURPLUS = _surplus()
CANDIDATES = _candidates()


def downsample_job(*, session: Session, job_id: str, budget: int) -> int | None:
    """Mark the finished job ``job_id`` downsampled to ``budget`` and delete its surplus
    points (see the module docstring), in ``session``'s transaction. Returns the number of
    rows deleted; None, deleting nothing, when the job is not finished or already
    downsampled to ``budget`` or less (another pass did it)."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1, not {budget}")
    marked = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(TERMINAL),
                          or_(Job.metrics_kept_per_series.is_(None),
                              Job.metrics_kept_per_series > budget))
        .values(metrics_kept_per_series=budget, updated_at=Job.updated_at)
        .execution_options(synchronize_session=False))
    if marked.rowcount != 1:
        return None
    return session.execute(SURPLUS, {"job_id": job_id, "budget": budget},
                           execution_options={"synchronize_session": False}).rowcount


def retention_pass(session_factory: sessionmaker[Session], budget: int, *,
                   stop: threading.Event | None = None) -> RetentionPass:
    """Downsample every finished job not downsampled to ``budget`` yet, one transaction
    each, until none is left or ``stop`` is set. ``budget`` 0: nothing to do."""
    result, started = RetentionPass(), time.monotonic()
    after = ""
    while budget and not (stop is not None and stop.is_set()):
        with session_factory() as session:
            found = list(session.scalars(CANDIDATES, {"after": after, "budget": budget}))
        for job_id in found:
            if stop is not None and stop.is_set():
                break
            with session_factory.begin() as session:
                deleted = downsample_job(session=session, job_id=job_id, budget=budget)
            if deleted is not None:
                result.jobs += 1
                result.deleted += deleted
        if len(found) < CANDIDATES_PER_READ:
            break
        after = found[-1]
    result.seconds = time.monotonic() - started
    return result


def keep_downsampling(session_factory: sessionmaker[Session], settings,  # noqa: ANN001
                      stop: threading.Event) -> None:
    """A dispatcher's retention thread: a :func:`retention_pass` every
    ``settings.metrics_retention_interval_s`` until ``stop`` (the first after a random part
    of one, so that dispatchers started together spread theirs). A failed pass (the
    database away) is logged; the next one takes up its work."""
    wait = random.uniform(0, settings.metrics_retention_interval_s)
    while not stop.wait(wait):
        wait = settings.metrics_retention_interval_s
        budget = settings.metrics_max_points_per_series
        if not budget:
            continue
        try:
            done = retention_pass(session_factory, budget, stop=stop)
        except Exception:  # noqa: BLE001 - the database away: the next pass retries
            logger.exception("metrics retention pass failed")
            continue
        if done.jobs:
            logger.info("metrics downsampled", extra={
                "jobs": done.jobs, "deleted": done.deleted, "budget": budget,
                "seconds": round(done.seconds, 3)})
