"""Writes the events of a job's run (:mod:`metaserve.workers.job_run`) to the database, in
batches, off the thread that runs the job: the dispatcher puts each event its supervisor
streams, this writes it to the job it belongs to (the job's own, or a job it started: a
sweep's trial) through the job store's guarded writes.

Fenced: every batch is one transaction that first checks (and row-locks) this attempt's
lease (:func:`metaserve.service.job_store.fence`), so an attempt that lost its lease writes
nothing, not even log lines; its events are counted in :attr:`RunEventWriter.refused` and in
``metaserve_fenced_writes``. A batch that fails on the database's side (an
``OperationalError``: the database restarting, a failover, a connection cut) is retried with
backoff, each wait at most a quarter of the lease (the batch lands soon after the database
is back), until it is written or refused: the database being away is no fault of the job.
A statement the database answered and refused (:func:`refused`: a statement or lock
timeout, a deadlock; SQLite busy past its timeout) is retried for at most a lease after the
first refusal, then the batch fails (the attempt is retried): the lease keeper renews the
lease meanwhile, so the fence would never end those retries."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from typing import Any, Callable

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from metaserve.service import child_jobs, job_logs, job_store, telemetry
from metaserve.service.exceptions import LeaseLost
from metaserve.service.orm import JobStatus
from metaserve.workers.object_store import ArtifactFile

logger = logging.getLogger(__name__)

RETRY_FIRST_S = 0.25


def transient(error: BaseException) -> bool:
    """A database error a retry may outlive: the server unreachable, restarting or failing
    over, a connection cut, SQLite busy."""
    return isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated)


# PostgreSQL SQLSTATEs of a statement the server refused while it answers: query_canceled
# (statement_timeout), lock_not_available (lock_timeout), serialization_failure,
# deadlock_detected.
REFUSED_SQLSTATES = frozenset({"57014", "55P03", "40001", "40P01"})


def refused(error: BaseException) -> bool:
    """A transient error of a database that answered and refused the statement (PostgreSQL's
    statement or lock timeout, a serialization failure or deadlock; SQLite locked past its
    busy timeout), not one that is away: a retry may outlive it, but the same statement may
    as well time out again, so its retries are bounded (by a lease)."""
    orig = getattr(error, "orig", None)
    if getattr(orig, "sqlstate", None) in REFUSED_SQLSTATES:
        return True
    return isinstance(orig, sqlite3.OperationalError) and (
        "locked" in str(orig) or "busy" in str(orig))


def backoff(lease_s: float):  # noqa: ANN201 - an iterator of waits
    """Waits between retries: doubling from :data:`RETRY_FIRST_S`, each at most a quarter of
    the lease (never so long that a lease the database still shows lapses unnoticed)."""
    wait, cap = RETRY_FIRST_S, max(RETRY_FIRST_S, lease_s / 4)
    while True:
        yield wait
        wait = min(wait * 2, cap)


class RunEventWriter:
    """Moves the events of a job's run (:mod:`metaserve.workers.job_run`) to the database off
    the training thread, each to the job it belongs to: the job's own, or a job it started."""

    def __init__(self, session_factory: sessionmaker[Session], worker_id: str, job_id: str,
                 attempt: int, children: set[str], *, lease_s: float = 30.0):
        """``children``: the ids of the jobs this run started, kept up to date here (the
        dispatcher's watch looks for their cancel requests). ``lease_s`` bounds the waits
        between retries of a batch the database refused (:func:`backoff`)."""
        self.session_factory, self.worker_id = session_factory, worker_id
        self.job_id, self.attempt, self.children = job_id, attempt, children
        self.lease_s = lease_s
        self.refused = 0  # events the fence refused: this attempt had lost its lease
        self.lease_lost = threading.Event()
        self.retries = 0  # batches written again after a database error
        self._abandon = threading.Event()
        self.queue: queue.Queue = queue.Queue()
        self.progress: dict[str, dict[str, Any]] = {}  # job id -> its progress and placement
        self.written = 0  # events written to the database so far
        self.on_written: Callable[[int], None] = lambda count: None
        self.thread = threading.Thread(target=self._run, name=f"writer-{self.job_id}",
                                       daemon=True)
        self.failure: BaseException | None = None
        self.thread.start()

    def put(self, job_id: str, kind: str, payload: Any) -> None:
        self.queue.put((job_id, kind, payload))

    def log(self, level: str, message: str) -> None:
        """A line of the dispatcher's own in the job's log (not one of the driver's events,
        so not counted in :attr:`written`)."""
        self.put(self.job_id, "dispatcher_logs", [{"time": time.time(), "level": level,
                                                   "source": "dispatcher", "message": message}])

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued so far, then stop; with ``timeout``, stop retrying a
        batch the database refuses once it is over (a drain's grace), raising the error."""
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            self._abandon.set()
            self.thread.join()
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            items = [item]
            while True:  # batch what is already there
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            done = any(entry is None for entry in items)
            batch = [entry for entry in items if entry is not None]
            try:
                if self.lease_lost.is_set():
                    raise LeaseLost(job_id=self.job_id, worker_id=self.worker_id)
                self._write_retrying(batch)
                self.written += sum(kind != "dispatcher_logs" for _, kind, _ in batch)
                if batch:
                    self.on_written(self.written)
            except LeaseLost:
                self._refuse(batch)
            except BaseException as error:  # noqa: BLE001 - reported by close()
                logger.exception("writing job records failed", extra={"job_id": self.job_id})
                self.failure = error
            if done:
                return

    def _refuse(self, batch: list[tuple[str, str, Any]]) -> None:
        """This attempt lost its lease: its events are dropped, counted, never written."""
        if not self.lease_lost.is_set():
            logger.warning("writes refused: this attempt lost its lease",
                           extra={"job_id": self.job_id, "attempt": self.attempt})
        self.lease_lost.set()
        self.refused += len(batch)
        telemetry.FENCED_WRITES.inc(len(batch))

    def _write_retrying(self, batch: list[tuple[str, str, Any]]) -> None:
        """:meth:`_write`, again after each transient database error (:func:`backoff`) until
        it lands, the fence refuses it, or :meth:`close`'s timeout abandons it; a statement
        the database refused (:func:`refused`) is retried for at most ``lease_s`` after the
        first refusal, then raised."""
        waits, refused_since = backoff(self.lease_s), None
        while True:
            try:
                self._write(batch)
                return
            except Exception as error:
                if not transient(error) or self._abandon.is_set():
                    raise
                if refused(error):
                    now = time.monotonic()
                    refused_since = now if refused_since is None else refused_since
                    if now - refused_since >= self.lease_s:
                        logger.error("writing job records: the database refused the batch "
                                     "for a lease; giving up", extra={
                                         "job_id": self.job_id, "error": str(error)[:200]})
                        raise
                wait = next(waits)
                logger.warning("writing job records failed; retrying in %.2f s", wait,
                               extra={"job_id": self.job_id, "error": str(error)[:200]})
                self.retries += 1
                telemetry.DATABASE_RETRIES.inc()
                if self._abandon.wait(wait):
                    raise

    def _write(self, items: list[tuple[str, str, Any]]) -> None:
        """One transaction per batch, fenced by this attempt's lease (raises
        :class:`LeaseLost`, writing nothing, when it is lost), in the order a job's rows
        need: the log, the jobs that started, then metrics, artifacts and progress, then the
        jobs that ended. Metrics replace an earlier attempt's at the same step (this
        attempt resumed from a checkpoint before them)."""
        started: list[tuple[str, dict[str, Any]]] = []
        ended: list[tuple[str, dict[str, Any]]] = []
        rows: dict[str, list[tuple[int, str, float]]] = {}
        files: dict[tuple[str, str], ArtifactFile] = {}
        changed: set[str] = set()
        records: list[dict[str, Any]] = []
        for job_id, kind, payload in items:
            if kind == "started":
                started.append((job_id, payload))
            elif kind == "ended":
                ended.append((job_id, payload))
            elif kind == "metrics":
                step, values = payload
                rows.setdefault(job_id, []).extend(
                    (step, name, float(value)) for name, value in values.items())
            elif kind in ("progress", "placement"):
                self.progress.setdefault(job_id, {})[kind] = payload
                changed.add(job_id)
            elif kind == "files":
                files.update({(job_id, file.name): file for file in payload})
            elif kind in ("logs", "dispatcher_logs"):
                records.extend(payload)  # the job's own log (a started job's go to it too)
        own, worker_id, attempt = self.job_id, self.worker_id, self.attempt
        with self.session_factory() as session:
            with session.begin():
                job_store.fence(session=session, job_id=own, worker_id=worker_id,
                                attempt=attempt)
                if records:
                    job_logs.add_log_records(session=session, job_id=own, attempt=attempt,
                                             records=records)
                for job_id, payload in started:
                    child_jobs.start_child_job(session=session, parent_job_id=own,
                                          worker_id=worker_id, job_id=job_id,
                                          key=payload["key"], name=payload["name"],
                                          spec=payload["spec"])
                    self.children.add(job_id)
                for job_id, values in rows.items():
                    job_store.add_metrics(session=session, job_id=job_id, rows=values,
                                          replace=True)
                for (job_id, _), file in files.items():
                    job_store.add_artifact(session=session, job_id=job_id, name=file.name,
                                       size=file.size, sha256=file.sha256,
                                       media_type=file.media_type)
                for job_id in changed:
                    progress = self._progress_of(job_id)
                    if job_id == own:
                        job_store.update_progress(session=session, job_id=own, worker_id=worker_id,
                                                  progress=progress, message="", attempt=attempt)
                    else:
                        child_jobs.update_child_progress(session=session, parent_job_id=own,
                                                    worker_id=worker_id, job_id=job_id,
                                                    progress=progress)
                for job_id, payload in ended:
                    child_jobs.end_child_job(session=session, parent_job_id=own, worker_id=worker_id,
                                        job_id=job_id, status=JobStatus(payload["status"]),
                                        message=payload["message"], error=payload.get("error"))

    def _progress_of(self, job_id: str) -> dict[str, Any]:
        """A job's progress row: its last progress report, with its placement."""
        reported = self.progress[job_id]
        progress = dict(reported.get("progress", {}))
        if "placement" in reported:
            progress["placement"] = reported["placement"]
        return progress
