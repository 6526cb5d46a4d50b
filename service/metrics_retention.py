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
more (every run write is fenced by an active lease), so the pass never races a writer. Per
job: one read names its series past the budget, each is downsampled by one DELETE in its own
transaction (on SQLite by a read of the ids to delete, which takes no lock in WAL mode,
then DELETEs of 1,000 ids each, so the file's write lock is held milliseconds at a time
while running jobs write), then the job is marked (``jobs.metrics_kept_per_series``,
migration 0014; its ``updated_at`` left as it was) so that the next pass skips it. A pass
cut short (a restart, the database away) leaves a job unmarked and the next pass does it
again, deleting only what is left. Two dispatchers' passes may meet on a job: they delete
the same rows, and the mark counts it once. A job whose DELETE the database refuses (one
series taking longer than METASERVE_DB_STATEMENT_TIMEOUT_S) is skipped, left unmarked for
the next pass, and the pass goes on with the other jobs. Lowering
the budget downsamples the marked jobs again; raising it brings nothing back.

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

from sqlalchemy import Integer, Select, bindparam, case, delete, func, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from metaserve.service.job_store import TERMINAL
from metaserve.service.orm import Job, Metric
from metaserve.service.run_events import refused

logger = logging.getLogger(__name__)

EXTRA_POINTS = 3  # kept past the budget: the last point, the lowest and the highest value
CANDIDATES_PER_READ = 100  # finished jobs found by one read of a pass


@dataclass
class RetentionPass:
    """What one pass did."""

    jobs: int = 0       # finished jobs downsampled (and marked)
    deleted: int = 0    # metric rows deleted
    skipped: int = 0    # jobs whose DELETE the database refused (left for the next pass)
    seconds: float = 0.0


def _surplus() -> Select:
    """The ids of one series' points past the budget (parameters ``job_id``, ``name``,
    ``budget``): window functions over the series' rows, in both dialects. Every window is
    over the series in step order, the order of the (job_id, name, step) index: one pass
    over its rows, no sort by value (the lowest and highest value are window aggregates,
    then the first step holding each)."""
    m = Metric.__table__.c
    series = m.name
    ranked = select(
        m.id, m.step, m.name,
        (func.row_number().over(partition_by=series, order_by=m.step) - 1).label("rank"),
        func.count().over(partition_by=series).label("points"),
        func.min(m.value).over(partition_by=series).label("lowest"),
        func.max(m.value).over(partition_by=series).label("highest"),
        m.value,
    ).where(m.job_id == bindparam("job_id"), m.name == bindparam("name")).subquery()
    r = ranked.c
    firsts = select(
        r.id, r.step, r.rank, r.points,
        func.min(case((r.value == r.lowest, r.step))).over(partition_by=r.name).label("low"),
        func.min(case((r.value == r.highest, r.step))).over(partition_by=r.name).label("high"),
    ).subquery()
    f = firsts.c
    budget = bindparam("budget", type_=Integer)
    stride = (f.points + budget - 1) // budget  # integer division: ceil(points / budget)
    doomed = select(f.id).where(
        f.points > budget + EXTRA_POINTS,
        f.rank % stride != 0,
        f.rank != f.points - 1,
        or_(f.low.is_(None), f.step != f.low),
        or_(f.high.is_(None), f.step != f.high))
    return doomed


def _unmarked():  # noqa: ANN202 - a WHERE clause
    """A finished job not downsampled to ``budget`` (or less) yet."""
    return (Job.status.in_(TERMINAL),
            or_(Job.metrics_kept_per_series.is_(None),
                Job.metrics_kept_per_series > bindparam("budget", type_=Integer)))


SURPLUS = _surplus()
DELETE_SURPLUS = delete(Metric).where(Metric.id.in_(SURPLUS))
# SQLite: ids deleted per transaction, so that the file's write lock is held for a few
# milliseconds at a time (the surplus is found by a read first, which takes no lock in WAL).
SQLITE_DELETE_CHUNK = 1000
DELETE_IDS = delete(Metric).where(Metric.id.in_(bindparam("ids", expanding=True)))
# The series of a job past the budget, if the job is finished and not marked: an index-only
# count over (job_id, name, step).
OVER_BUDGET = (select(Metric.name).join(Job, Job.id == Metric.job_id)
               .where(Metric.job_id == bindparam("job_id"), *_unmarked())
               .group_by(Metric.name)
               .having(func.count() > bindparam("budget", type_=Integer) + EXTRA_POINTS))
MARK = (update(Job).where(Job.id == bindparam("job_id"), *_unmarked())
        .values(metrics_kept_per_series=bindparam("budget", type_=Integer),
                updated_at=Job.updated_at)
        .execution_options(synchronize_session=False))
# Finished jobs not downsampled to ``budget`` yet, after ``after`` in id order.
CANDIDATES = (select(Job.id).where(Job.id > bindparam("after"), *_unmarked())
              .order_by(Job.id).limit(CANDIDATES_PER_READ))


def downsample_job(session_factory: sessionmaker[Session], job_id: str,
                   budget: int) -> int | None:
    """Downsample the finished job ``job_id``'s series to ``budget`` points (see the module
    docstring), one transaction per series, then mark it. Returns the number of rows
    deleted; None when the job is not finished, or was already downsampled to ``budget``
    or less (by another pass, say) before its mark here."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1, not {budget}")
    values = {"job_id": job_id, "budget": budget}
    with session_factory() as session:
        names = list(session.scalars(OVER_BUDGET, values))
        sqlite = session.get_bind().dialect.name == "sqlite"
    deleted = 0
    for name in names:
        deleted += _delete_surplus(session_factory, {**values, "name": name}, sqlite)
    with session_factory.begin() as session:
        marked = session.execute(MARK, values).rowcount == 1
    return deleted if marked else None


def _delete_surplus(session_factory: sessionmaker[Session], values: dict, sqlite: bool) -> int:
    """Delete one series' surplus: one DELETE on PostgreSQL (no lock but the rows'); on
    SQLite, read the ids, then delete them :data:`SQLITE_DELETE_CHUNK` a transaction."""
    plain = {"synchronize_session": False}
    if not sqlite:
        with session_factory.begin() as session:
            return session.execute(DELETE_SURPLUS, values, execution_options=plain).rowcount
    with session_factory() as session:
        ids = list(session.scalars(SURPLUS, values))
    deleted = 0
    for start in range(0, len(ids), SQLITE_DELETE_CHUNK):
        with session_factory.begin() as session:
            deleted += session.execute(DELETE_IDS, {"ids": ids[start:start + SQLITE_DELETE_CHUNK]},
                                       execution_options=plain).rowcount
    return deleted


def retention_pass(session_factory: sessionmaker[Session], budget: int, *,
                   stop: threading.Event | None = None) -> RetentionPass:
    """Downsample every finished job not downsampled to ``budget`` yet, until none is left
    or ``stop`` is set. ``budget`` 0: nothing to do. A job whose DELETE the database refuses
    (:func:`~metaserve.service.run_events.refused`: a statement timeout) is skipped, left
    for the next pass; any other database error ends the pass."""
    result, started = RetentionPass(), time.monotonic()
    after = ""
    while budget and not (stop is not None and stop.is_set()):
        with session_factory() as session:
            found = list(session.scalars(CANDIDATES, {"after": after, "budget": budget}))
        for job_id in found:
            if stop is not None and stop.is_set():
                break
            try:
                deleted = downsample_job(session_factory, job_id, budget)
            except OperationalError as error:
                if not refused(error):
                    raise
                logger.warning("metrics retention: the database refused a job's DELETE; "
                               "skipped", extra={"job_id": job_id, "error": str(error)[:200]})
                result.skipped += 1
                continue
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
