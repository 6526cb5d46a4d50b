"""A job's log: the records of its driver and inner-loop workers (tracebacks included), and
lines of the dispatcher about its attempts, stored with the job in ``job_logs``.

Bounded: a job keeps its last :data:`MAX_LOG_RECORDS` records (older ones are deleted as new
ones arrive), each at most :data:`MAX_MESSAGE_CHARS` long. Records are numbered per job from 1
(``seq``) across attempts, so ``min(seq) - 1`` were dropped, and a reader shows that as a
marker line before the first kept one. ``seq`` is also the follow cursor of
``GET /v1/jobs/{id}/logs?follow=true``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from metaserve.service import job_store
from metaserve.service.orm import JobLogLine, JobStatus, User

MAX_LOG_RECORDS = 10_000
MAX_MESSAGE_CHARS = 16_000
MAX_LOG_PAGE = 5_000
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"{text[:limit]}\n[... {cut:,} more characters dropped]"


def add_log_records(*, session: Session, job_id: str, attempt: int,
                    records: Sequence[dict[str, Any]], keep: int = MAX_LOG_RECORDS) -> int:
    """Append ``records`` (``{"time": epoch seconds, "level", "source", "message"}``) to the
    job's log and delete its records older than the last ``keep``. Returns the last seq.
    One writer per job: the dispatcher holding its lease, in its fenced transaction
    (:mod:`metaserve.service.run_events`); without a transaction open, in one of its own."""
    if not records:
        return 0
    with nullcontext() if session.in_transaction() else session.begin():
        last = session.scalar(select(func.max(JobLogLine.seq))
                              .where(JobLogLine.job_id == job_id)) or 0
        rows = []
        for offset, record in enumerate(records[-keep:], start=1):
            level = str(record.get("level", "INFO")).upper()
            rows.append({
                "job_id": job_id, "seq": last + offset, "attempt": attempt,
                "time": datetime.fromtimestamp(float(record.get("time", 0.0)), timezone.utc),
                "level": level if level in LEVELS else "INFO",
                "source": str(record.get("source", ""))[:200],
                "message": _clip(str(record.get("message", "")), MAX_MESSAGE_CHARS),
            })
        # Records beyond ``keep`` in one batch were never stored: their seqs are skipped, so
        # the reader's dropped count includes them.
        skipped = len(records) - len(rows)
        for row in rows:
            row["seq"] += skipped
        session.execute(JobLogLine.__table__.insert(), rows)
        last = rows[-1]["seq"]
        if last > keep:
            session.execute(delete(JobLogLine).where(JobLogLine.job_id == job_id,
                                                     JobLogLine.seq <= last - keep))
        return last


@dataclass(frozen=True)
class LogPage:
    """Records after a cursor: ``lines`` (the dropped-records marker first when the reader is
    before it), ``next_after`` (the cursor to read on from), ``terminal`` (the job has ended,
    so with ``complete`` nothing more will come), ``complete`` (no record after this page)."""

    lines: list[dict[str, Any]]
    next_after: int
    dropped: int
    status: str
    complete: bool

    @property
    def ended(self) -> bool:
        return self.complete and JobStatus(self.status).is_terminal()


def line_data(row: JobLogLine) -> dict[str, Any]:
    return {"seq": row.seq, "time": row.time.isoformat(), "attempt": row.attempt,
            "level": row.level, "source": row.source, "message": row.message}


def read_logs(*, session: Session, job_id: str, owner: User, after: int = 0,
              limit: int = 1000) -> LogPage:
    """``owner``'s job's log records with ``seq > after`` (another user's job raises
    :class:`~metaserve.service.exceptions.JobNotFound`). The status is read first: when it is
    terminal, every record of the job is already committed (the dispatcher writes the log
    before it settles the job)."""
    limit = max(1, min(limit, MAX_LOG_PAGE))
    with session.begin():
        job = job_store.get_job_row(session=session, job_id=job_id, owner=owner)
        status = job.status
        first = session.scalar(select(func.min(JobLogLine.seq))
                               .where(JobLogLine.job_id == job_id))
        rows = list(session.scalars(
            select(JobLogLine).where(JobLogLine.job_id == job_id, JobLogLine.seq > after)
            .order_by(JobLogLine.seq).limit(limit + 1)))
    complete = len(rows) <= limit
    rows = rows[:limit]
    lines = [line_data(row) for row in rows]
    dropped = (first - 1) if first else 0
    if dropped and after < dropped and rows:
        lines.insert(0, {"seq": dropped, "time": rows[0].time.isoformat(),
                         "attempt": rows[0].attempt, "level": "WARNING", "source": "metaserve",
                         "message": f"[{dropped:,} earlier log records dropped: a job's log "
                                    "keeps its most recent records]"})
    next_after = rows[-1].seq if rows else after
    return LogPage(lines=lines, next_after=next_after, dropped=dropped, status=status,
                   complete=complete)
