"""The job list: sorted, filtered and paged (``GET /v1/jobs``), what each listed job carries
beyond its row (its latest metric values, a sweep driver's trial count, the status history of
one job), and the changes a list stream sends.

Sorting. ``created_at`` orders by id: ids are time-ordered (service/ids.py), so the default
page is the owner's ``(owner_id, id)`` index read backwards and its cursor is the id alone
(what it always was). Every other key is one SQL expression (a column, ``finished_at -
started_at``, a job's latest value of a metric, a spec field) and pages by keyset on
``(value, id)``, jobs without a value last in either order; the cursor carries the sort it
belongs to. Those sorts read the owner's matching jobs through the same index and sort them:
a user has thousands of jobs, not millions, and a metric's latest value per job is one probe
of the metrics' unique ``(job_id, name, step)`` index, so no index per sort key is kept (each
would be written on every progress update). ``updated_at`` has an index (migration 0015) for
the list stream's poll, which the ``updated_at`` sort uses too.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import Float, and_, bindparam, case, cast, func, or_, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from metaserve.service import job_store
from metaserve.service.db import UNICODE_LOWER
from metaserve.service.exceptions import InvalidCursor, InvalidListQuery
from metaserve.service.orm import Job, JobStatus, JobStatusEvent, Metric, Sweep, User

MAX_PAGE = job_store.MAX_PAGE
SORTS = ("created_at", "name", "status", "updated_at", "duration")
SORT_PREFIXES = ("metric:", "param:")
ORDERS = ("asc", "desc")
TRIALS = ("fold", "show", "only")
_PATH_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
MAX_PATH_DEPTH = 8


def _invalid(field: str, message: str) -> InvalidListQuery:
    return InvalidListQuery(message, **{field: message})


@dataclass(frozen=True)
class Sort:
    key: str  # as given: created_at, name, ..., metric:<name>, param:<path>
    kind: str  # created_at, name, status, updated_at, duration, metric, param
    argument: str | tuple[str, ...] | None = None


def parse_sort(sort: str) -> Sort:
    """The sort key ``sort`` names, or :class:`InvalidListQuery` naming ``sort``."""
    if sort in SORTS:
        return Sort(key=sort, kind=sort)
    if sort.startswith("metric:"):
        name = sort[len("metric:"):]
        if not name or len(name) > 200:
            raise _invalid("sort", "metric:<name> needs a metric name (at most 200 "
                                         "characters), e.g. metric:val/loss_step1")
        return Sort(key=sort, kind="metric", argument=name)
    if sort.startswith("param:"):
        path = tuple(sort[len("param:"):].split("."))
        if len(path) > MAX_PATH_DEPTH or not all(_PATH_SEGMENT.match(part) for part in path):
            raise _invalid("sort", "param:<path> needs a dotted spec path of names, "
                                         "e.g. param:algorithm.inner_lr")
        return Sort(key=sort, kind="param", argument=path)
    raise _invalid("sort", f"unknown sort {sort!r}: one of {', '.join(SORTS)}, "
                                 "metric:<name>, param:<dotted.spec.path>")


def parse_statuses(values: Sequence[str] | None) -> list[str]:
    """``status`` given repeated and/or as a comma list, each a job status."""
    statuses: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                statuses.append(JobStatus(part).value)
            except ValueError:
                raise _invalid("status", f"unknown status {part!r}: one of "
                                     f"{', '.join(s.value for s in JobStatus)}") from None
    return list(dict.fromkeys(statuses))


@dataclass
class Listing:
    """One page: the jobs, how many match in all, the next page's cursor, and per job its
    latest metric values and (a sweep's driver) its sweep and trial count."""

    jobs: list[Any]
    total: int
    next_cursor: str | None
    latest_metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    driven_sweeps: dict[str, tuple[str, int]] = field(default_factory=dict)


def _is_sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def _sort_expression(session: Session, sort: Sort) -> Any:
    if sort.kind in ("name", "status", "updated_at"):
        return getattr(Job, sort.kind)
    if sort.kind == "duration":  # finished jobs only: a running job's would move between pages
        if _is_sqlite(session):
            return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
        return cast(func.extract("epoch", Job.finished_at - Job.started_at), Float)
    if sort.kind == "metric":
        return (select(Metric.value)
                .where(Metric.job_id == Job.id, Metric.name == sort.argument)
                .order_by(Metric.step.desc()).limit(1).scalar_subquery())
    # param: one comparable value per job, numbers by value, text by text
    if _is_sqlite(session):
        return func.json_extract(Job.spec, "$." + ".".join(sort.argument))
    return cast(Job.spec, JSONB)[tuple(sort.argument)]


def _bind(session: Session, sort: Sort, value: Any) -> Any:
    """The cursor's value as a bound parameter comparable with the sort expression."""
    if sort.kind == "updated_at":
        return datetime.fromisoformat(value)
    if sort.kind == "param" and not _is_sqlite(session):
        return bindparam("cursor_value", value, type_=JSONB)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return value


def _encode(sort: Sort, order: str, value: Any, job_id: str) -> str:
    raw = json.dumps([sort.key, order, _plain(value), job_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str, sort: Sort, order: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        key, cursor_order, value, job_id = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
        raise InvalidCursor(cursor=cursor) from None
    if key != sort.key or cursor_order != order or not isinstance(job_id, str):
        raise InvalidCursor("the cursor belongs to another sort or order: page again from the "
                            "first page", cursor=cursor)
    if value is not None and not _fits(sort.kind, value):
        raise InvalidCursor(cursor=cursor)
    return value, job_id


def _fits(kind: str, value: Any) -> bool:
    """Whether a cursor's value has the type of the sort's values (a forged one must not
    reach the database as a comparison of mismatched types)."""
    if kind in ("name", "status"):
        return isinstance(value, str)
    if kind in ("duration", "metric"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "updated_at":
        try:
            return datetime.fromisoformat(value).tzinfo is not None
        except (TypeError, ValueError):
            return False
    return True  # param: any JSON value


def _filters(session: Session, owner: User, *, statuses: Sequence[str], algorithm: str | None,
             family: str | None, sweep_id: str | None, name: str | None,
             trials: str) -> list[Any]:
    where: list[Any] = []
    if not owner.is_admin:
        where.append(Job.owner_id == owner.id)
    if statuses:
        where.append(Job.status.in_(list(statuses)))
    if algorithm is not None:
        where.append(Job.spec[("algorithm", "name")].as_string() == algorithm)
    if family is not None:
        where.append(Job.spec[("task_family", "name")].as_string() == family)
    if sweep_id is not None:
        where.append(Job.sweep_id == sweep_id)
    if trials == "fold":
        where.append(Job.sweep_id.is_(None))
    elif trials == "only":
        where.append(Job.sweep_id.is_not(None))
    if name is not None:
        lower = getattr(func, UNICODE_LOWER) if _is_sqlite(session) else func.lower
        where.append(lower(Job.name).contains(name.lower(), autoescape=True))
    return where


def list_jobs(*, session: Session, owner: User, sort: str = "created_at", order: str = "desc",
              statuses: Sequence[str] = (), algorithm: str | None = None,
              family: str | None = None, sweep_id: str | None = None, name: str | None = None,
              trials: str | None = None, cursor: str | None = None,
              limit: int = 50) -> Listing:
    """A page of ``owner``'s jobs (an admin's: everyone's) sorted by ``sort`` in ``order``.

    ``trials``: ``fold`` hides sweep trials (their sweep's driver job stands for them, with a
    trial count), ``show`` lists them too, ``only`` lists trials alone; default ``fold``, or
    ``show`` when ``sweep_id`` asks for one sweep's trials. Raises :class:`InvalidListQuery`
    naming a bad parameter and :class:`InvalidCursor` for a cursor of no page of this list."""
    parsed = parse_sort(sort)
    if order not in ORDERS:
        raise _invalid("order", f"unknown order {order!r}: asc or desc")
    trials = trials or ("show" if sweep_id is not None else "fold")
    if trials not in TRIALS:
        raise _invalid("trials", f"unknown trials {trials!r}: one of {', '.join(TRIALS)}")
    limit = max(1, min(limit, MAX_PAGE))
    where = _filters(session, owner, statuses=statuses, algorithm=algorithm, family=family,
                     sweep_id=sweep_id, name=name, trials=trials)
    total = session.execute(select(func.count()).select_from(Job).where(*where)).scalar_one()
    descending = order == "desc"
    query = select(Job).where(*where).limit(limit + 1)
    if parsed.kind == "created_at":
        query = query.order_by(Job.id.desc() if descending else Job.id.asc())
        if cursor:  # an empty cursor (`cursor=`) is the first page
            after = job_store.decode_cursor(cursor)
            query = query.where(Job.id < after if descending else Job.id > after)
        jobs = list(session.scalars(query))
        next_cursor = (job_store.encode_cursor(jobs[limit - 1].id) if len(jobs) > limit
                       else None)
    else:
        value = _sort_expression(session, parsed).label("sort_value")
        missing = case((value.is_(None), 1), else_=0)
        query = query.add_columns(value).order_by(
            missing, value.desc() if descending else value.asc(),
            Job.id.desc() if descending else Job.id.asc())
        if cursor:
            after_value, after_id = _decode(cursor, parsed, order)
            beyond_id = Job.id < after_id if descending else Job.id > after_id
            if after_value is None:
                query = query.where(value.is_(None), beyond_id)
            else:
                bound = _bind(session, parsed, after_value)
                beyond = value < bound if descending else value > bound
                query = query.where(or_(value.is_(None), and_(
                    value.is_not(None), or_(beyond, and_(value == bound, beyond_id)))))
        rows = session.execute(query).all()
        jobs = [row[0] for row in rows]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = _encode(parsed, order, _json_value(last[1]), last[0].id)
    jobs = jobs[:limit]
    ids = [job.id for job in jobs]
    return Listing(jobs=jobs, total=total, next_cursor=next_cursor,
                   latest_metrics=latest_metrics(session=session, job_ids=ids),
                   driven_sweeps=driven_sweeps(session=session, job_ids=ids))


def _json_value(value: Any) -> Any:
    """A sort value as the cursor keeps it (PostgreSQL's jsonb arrives parsed already)."""
    if isinstance(value, (datetime, str, int, float, bool)) or value is None:
        return value
    return json.loads(json.dumps(value, default=str))


# Each job's metric names by a skip scan of the unique (job_id, name, step) index (one probe
# per name, not a read of every value), then one probe per name for its value at the last step.
_LATEST_METRICS = text("""
WITH RECURSIVE names(job_id, name) AS (
    SELECT j.id, (SELECT min(m.name) FROM metrics m WHERE m.job_id = j.id)
    FROM jobs j WHERE j.id IN :job_ids
    UNION ALL
    SELECT n.job_id, (SELECT min(m.name) FROM metrics m WHERE m.job_id = n.job_id
                                                        AND m.name > n.name)
    FROM names n WHERE n.name IS NOT NULL
)
SELECT n.job_id, n.name,
       (SELECT m.value FROM metrics m WHERE m.job_id = n.job_id AND m.name = n.name
        ORDER BY m.step DESC LIMIT 1) AS value
FROM names n WHERE n.name IS NOT NULL
""").bindparams(bindparam("job_ids", expanding=True))


def latest_metrics(*, session: Session, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each job's latest value of each of its metrics (``None`` where it was NaN or ±inf)."""
    found: dict[str, dict[str, Any]] = {job_id: {} for job_id in job_ids}
    if job_ids:
        for job_id, name, value in session.execute(_LATEST_METRICS,
                                                   {"job_ids": list(job_ids)}):
            found[job_id][name] = value
    return found


def driven_sweeps(*, session: Session, job_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """For each of ``job_ids`` that is a sweep's driver: (the sweep's id, its trial count)."""
    if not job_ids:
        return {}
    trials = (select(func.count()).select_from(Job).where(Job.sweep_id == Sweep.id)
              .scalar_subquery())
    rows = session.execute(select(Sweep.driver_job_id, Sweep.id, trials)
                           .where(Sweep.driver_job_id.in_(list(job_ids))))
    return {driver: (sweep, count) for driver, sweep, count in rows}


def status_history(*, session: Session, job_id: str) -> list[JobStatusEvent]:
    """The job's status changes, oldest first."""
    return list(session.scalars(select(JobStatusEvent).where(JobStatusEvent.job_id == job_id)
                                .order_by(JobStatusEvent.id)))


def changed_jobs(*, session: Session, owner: User, after: tuple[datetime, str] | None,
                 trials: str = "fold", limit: int = MAX_PAGE, newest: int = 0) -> list[Job]:
    """``owner``'s jobs changed after ``after`` (``(updated_at, id)`` of the last one seen),
    oldest change first: what the list stream sends. ``newest``: instead, the ``newest`` most
    recently changed (where a new stream starts)."""
    where = _filters(session, owner, statuses=(), algorithm=None, family=None, sweep_id=None,
                     name=None, trials=trials)
    if newest:
        return list(session.scalars(select(Job).where(*where)
                                    .order_by(Job.updated_at.desc(), Job.id.desc())
                                    .limit(newest)))
    if after is not None:
        at, job_id = after
        where.append(or_(Job.updated_at > at, and_(Job.updated_at == at, Job.id > job_id)))
    return list(session.scalars(select(Job).where(*where)
                                .order_by(Job.updated_at, Job.id).limit(limit)))

