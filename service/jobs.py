"""The service layer: validates, calls the store, owns the transaction (commit on success,
rollback on error). The API routes and the dispatcher call these, never :mod:`metaserve.service.store`
directly for writes."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, TypeVar

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from metaserve.service import store
from metaserve.service.artifacts import ArtifactNotFound
from metaserve.service.exceptions import MetaserveError
from metaserve.service.models import Artifact, Job, JobStatus, JobStatusEvent, Metric, User
from metaserve.service.settings import QUOTA_RETRY_AFTER_S
from metaserve.workers.spec import JobSpec

T = TypeVar("T")


def canonical_spec(spec: JobSpec) -> dict[str, Any]:
    """The validated spec with every default filled in, as plain JSON data."""
    return spec.model_dump(mode="json")


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of a spec."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def default_job_name(spec: JobSpec) -> str:
    return spec.name or f"{spec.algorithm.name}-{spec.task_family.name}"


def _in_transaction(function: Callable[..., T]) -> Callable[..., T]:
    """The store function ``function`` (keyword arguments, one of them ``session``) in a
    transaction: committed when it returns, rolled back when it raises."""

    @functools.wraps(function)
    def in_transaction(**kwargs: Any) -> T:
        with _Transaction(kwargs["session"]):
            return function(**kwargs)

    return in_transaction


class _Transaction:
    def __init__(self, session: Session) -> None:
        self.session = session

    def __enter__(self) -> Session:
        return self.session

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            self.session.commit()
        else:
            self.session.rollback()


def submit_job(*, session: Session, owner: User, spec: JobSpec,
               idempotency_key: str | None = None, max_queued: int = 0,
               retry_after_s: int = QUOTA_RETRY_AFTER_S) -> tuple[Job, bool]:
    """Store a queued job; returns ``(job, created)`` (False when an idempotent replay).

    ``max_queued`` (0: no cap): beyond that many queued jobs of ``owner``, raise
    :class:`~metaserve.service.exceptions.QuotaExceeded` (429, ``Retry-After: retry_after_s``)
    and store nothing; a replay of an existing job still returns it."""
    data = canonical_spec(spec)
    with _Transaction(session):
        return store.create_job(session=session, owner=owner, name=default_job_name(spec),
                                spec=data, spec_hash=spec_hash(data),
                                max_attempts=spec.max_attempts, idempotency_key=idempotency_key,
                                max_queued=max_queued, retry_after_s=retry_after_s)


get_job = _in_transaction(store.get_job_row)
list_jobs = _in_transaction(store.list_jobs)
request_cancel = _in_transaction(store.request_cancel)


# --------------------------------------------------------------------------- dispatcher API


claim_next_job = _in_transaction(store.claim_next_job)
expire_leases = _in_transaction(store.expire_leases)


def job_status(*, session: Session, job_id: str) -> JobStatus:
    with _Transaction(session):
        return JobStatus(store.job_status(session=session, job_id=job_id))


renew_lease = _in_transaction(store.renew_lease)
update_progress = _in_transaction(store.update_progress)
release_job = _in_transaction(store.release_job)
finish_job = _in_transaction(store.finish_job)
fail_attempt = _in_transaction(store.fail_attempt)
add_metrics = _in_transaction(store.add_metrics)
get_metrics = _in_transaction(store.get_metrics)
add_artifact = _in_transaction(store.add_artifact)
list_artifacts = _in_transaction(store.list_artifacts)


# --------------------------------------------------------------------------- metrics, artifacts (API)


def get_metrics_page(*, session: Session, job_id: str, owner: User, name: str | None = None,
                     since_step: int | None = None,
                     limit: int = 1000) -> tuple[list[Metric], int | None]:
    """One page of a job's metrics ordered by (step, name), and the ``since_step`` of the next
    page (None on the last one). ``since_step`` is exclusive.

    A page holds whole steps, so paging by step never drops the other series of a step cut
    at the page boundary: a partial last step is left to the next page, and a single step
    with more than ``limit`` values is returned whole. Another user's job raises
    :class:`~metaserve.service.exceptions.JobNotFound`.
    """
    with _Transaction(session):
        store.get_job(session=session, job_id=job_id, owner=owner)
        query = select(Metric).where(Metric.job_id == job_id)
        if name is not None:
            query = query.where(Metric.name == name)
        if since_step is not None:
            query = query.where(Metric.step > since_step)
        rows = list(session.scalars(query.order_by(Metric.step, Metric.name).limit(limit + 1)))
        if len(rows) <= limit:
            return rows, None
        page, last_step = rows[:limit], rows[limit - 1].step
        if rows[limit].step == last_step:  # the page would cut a step in two
            page = [row for row in page if row.step < last_step]
            if not page:
                page = list(session.scalars(query.where(Metric.step == last_step)
                                            .order_by(Metric.name)))
        return page, page[-1].step


def list_job_artifacts(*, session: Session, job_id: str, owner: User) -> list[Artifact]:
    """The artifacts of ``owner``'s job ``job_id`` by name (another user's job: JobNotFound)."""
    with _Transaction(session):
        store.get_job(session=session, job_id=job_id, owner=owner)
        return store.list_artifacts(session=session, job_id=job_id)


def get_artifact(*, session: Session, job_id: str, owner: User, name: str) -> Artifact:
    """The artifact record ``name`` of ``owner``'s job; raises
    :class:`~metaserve.service.artifacts.ArtifactNotFound` when the job has no artifact of that name
    (compared in Python, so any client string is harmless) and JobNotFound for another
    user's job."""
    for artifact in list_job_artifacts(session=session, job_id=job_id, owner=owner):
        if artifact.name == name:
            return artifact
    raise ArtifactNotFound(job_id=job_id, name=name)


# --------------------------------------------------------------------------- events (API)
#
# The events of a job are built from durable data only, so that a stream resumed from its
# Last-Event-ID neither loses nor repeats one. An event id is a cursor of three counters,
# ``"<status event id>-<metric row id>-<iteration>"``; every event raises exactly one of them
# and none ever falls, so a reconnect sends exactly the events whose counter is above the cursor:
#
# * status: the rows of ``job_status_events``, which the store appends in the transaction of
#   every status change, so each change (also a ``cancelling`` or a retry's ``queued`` that
#   lasts a millisecond) is an event, in order. Row ids are allocated after the job row is
#   locked by its guarded update, so a job's history commits in id order.
# * metrics: the metric rows by their id (one dispatcher writes a job's rows, in order), one
#   event per step with every value of that step read in the same poll.
# * progress: the row's progress snapshot, when its iteration rises above the cursor's
#   (0: none seen; a resumed attempt restarting below it is reported once it passes it).


class InvalidEventId(MetaserveError):
    """Invalid Last-Event-ID: expected the id of an event of this stream, e.g. 5-120-50."""

    status_code = 422
    code = "validation_error"


EVENT_ID = re.compile(r"\s*([0-9]{1,18})-([0-9]{1,18})-([0-9]{1,18})\s*")
"""An event id: three counters of at most 18 digits (more could overflow a database integer:
a 500 in the middle of the stream), as the route's schema pattern says."""


@dataclass(frozen=True)
class EventCursor:
    """Where a client is in a job's event stream (see the comment above)."""

    status_event_id: int = 0
    metric_id: int = 0
    iteration: int = 0

    def __str__(self) -> str:
        return f"{self.status_event_id}-{self.metric_id}-{self.iteration}"

    @classmethod
    def parse(cls, text: str | None) -> "EventCursor":
        if not text:
            return cls()
        match = EVENT_ID.fullmatch(text)
        if match is None:
            raise InvalidEventId(**{"last-event-id": text[:100]})
        return cls(*(int(counter) for counter in match.groups()))


@dataclass(frozen=True)
class JobEvent:
    """One event: ``id`` is the cursor after it, ``kind`` status | metrics | progress."""

    id: EventCursor
    kind: str
    data: dict[str, Any]


MAX_METRIC_ROWS_PER_POLL = 5000


def poll_job_events(*, session: Session, job_id: str, owner: User,
                    after: EventCursor) -> tuple[list[JobEvent], bool]:
    """The job's events after ``after`` in stream order, and whether the job is terminal
    (then the list ends with its terminal status and the stream is complete). Another user's
    job raises :class:`~metaserve.service.exceptions.JobNotFound`."""
    with _Transaction(session):
        job = store.get_job(session=session, job_id=job_id, owner=owner)
        progress = dict(job.progress or {})
        changes = list(session.scalars(
            select(JobStatusEvent).where(JobStatusEvent.job_id == job_id,
                                         JobStatusEvent.id > after.status_event_id)
            .order_by(JobStatusEvent.id)))
        metric_rows = list(session.scalars(
            select(Metric).where(Metric.job_id == job_id, Metric.id > after.metric_id)
            .order_by(Metric.id).limit(MAX_METRIC_ROWS_PER_POLL)))
    events: list[JobEvent] = []
    cursor = after

    def add(kind: str, data: dict[str, Any], **moved: int) -> None:
        nonlocal cursor
        cursor = replace(cursor, **moved)
        events.append(JobEvent(cursor, kind, data))

    terminal = changes[-1] if changes and JobStatus(changes[-1].status).is_terminal() else None
    for change in changes:
        if change is not terminal:
            add("status", _status_data(change), status_event_id=change.id)
    step_values: dict[str, float | None] = {}
    for index, row in enumerate(metric_rows):
        step_values[row.name] = row.value
        last_of_step = index + 1 == len(metric_rows) or metric_rows[index + 1].step != row.step
        if last_of_step:
            add("metrics", {"step": row.step, "values": step_values}, metric_id=row.id)
            step_values = {}
    iteration = progress.get("iteration")
    if isinstance(iteration, int) and iteration > cursor.iteration:
        add("progress", progress, iteration=iteration)
    # A client resuming at or after the terminal event (no change left, the job terminal)
    # has had it: the stream is complete too, without sending it twice.
    ended = terminal is not None or (not changes and JobStatus(job.status).is_terminal())
    complete = ended and len(metric_rows) < MAX_METRIC_ROWS_PER_POLL
    if complete and terminal is not None:  # last: after every metric the job wrote before it ended
        add("status", _status_data(terminal), status_event_id=terminal.id)
    return events, complete


def _status_data(change: JobStatusEvent) -> dict[str, Any]:
    return {"status": change.status, "attempt": change.attempt, "message": change.message,
            "error": change.error}
