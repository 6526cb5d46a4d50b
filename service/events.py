"""The events of a job for its SSE stream (``GET /v1/jobs/{id}/events``), built from durable
data only, so that a stream resumed from its Last-Event-ID neither loses nor repeats one."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from metaserve.service import job_store
from metaserve.service.exceptions import InvalidEventId
from metaserve.service.orm import Job, JobStatus, JobStatusEvent, Metric, User


# An event id is a cursor of three counters,
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
    with session.begin():
        job = job_store.get_job(session=session, job_id=job_id, owner=owner)
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


def job_marks(*, session: Session, job_ids: list[str]) -> dict[str, tuple[Any, int]]:
    """``(updated_at, last metric row id)`` of each of ``job_ids`` that exists: every event of
    a job moves one of the two (a status change or progress updates the job row; metrics add
    rows). Two queries for all the jobs, by primary key and by the metrics' (job_id, id) index."""
    with session.begin():
        updated = dict(session.execute(
            select(Job.id, Job.updated_at).where(Job.id.in_(job_ids))).all())
        last_metric = dict(session.execute(
            select(Metric.job_id, func.max(Metric.id)).where(Metric.job_id.in_(job_ids))
            .group_by(Metric.job_id)).all())
    return {job_id: (changed_at, last_metric.get(job_id, 0))
            for job_id, changed_at in updated.items()}


def _status_data(change: JobStatusEvent) -> dict[str, Any]:
    return {"status": change.status, "attempt": change.attempt, "message": change.message,
            "error": change.error}
