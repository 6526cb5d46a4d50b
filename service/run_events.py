"""Writes the events of a job's run (:mod:`metaserve.workers.job_run`) to the database, in
batches, off the thread that runs the job: the dispatcher puts each event its supervisor
streams, this writes it to the job it belongs to (the job's own, or a job it started: a
sweep's trial) through the job store's guarded writes."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from sqlalchemy.orm import Session, sessionmaker

from metaserve.service import child_jobs, job_logs, job_store
from metaserve.service.orm import JobStatus
from metaserve.workers.object_store import ArtifactFile

logger = logging.getLogger(__name__)


class RunEventWriter:
    """Moves the events of a job's run (:mod:`metaserve.workers.job_run`) to the database off
    the training thread, each to the job it belongs to: the job's own, or a job it started."""

    def __init__(self, session_factory: sessionmaker[Session], worker_id: str, job_id: str,
                 attempt: int, children: set[str]):
        """``children``: the ids of the jobs this run started, kept up to date here (the
        dispatcher's watch looks for their cancel requests)."""
        self.session_factory, self.worker_id = session_factory, worker_id
        self.job_id, self.attempt, self.children = job_id, attempt, children
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

    def close(self) -> None:
        """Write everything queued so far, then stop."""
        self.queue.put(None)
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
                self._write(batch)
                self.written += sum(kind != "dispatcher_logs" for _, kind, _ in batch)
                if batch:
                    self.on_written(self.written)
            except BaseException as error:  # noqa: BLE001 - reported by close()
                logger.exception("writing job records failed", extra={"job_id": self.job_id})
                self.failure = error
            if done:
                return

    def _write(self, items: list[tuple[str, str, Any]]) -> None:
        """One transaction per batch, in the order a job's rows need: the jobs that started,
        then metrics, artifacts and progress, then the jobs that ended."""
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
        own, worker_id = self.job_id, self.worker_id
        with self.session_factory() as session:
            if records:  # best effort: a log that cannot be written never fails the job
                try:
                    job_logs.add_log_records(session=session, job_id=own,
                                             attempt=self.attempt, records=records)
                except Exception:  # noqa: BLE001
                    logger.exception("writing the job's log failed", extra={"job_id": own})
            with session.begin():
                for job_id, payload in started:
                    child_jobs.start_child_job(session=session, parent_job_id=own,
                                          worker_id=worker_id, job_id=job_id,
                                          key=payload["key"], name=payload["name"],
                                          spec=payload["spec"])
                    self.children.add(job_id)
                for job_id, values in rows.items():
                    job_store.add_metrics(session=session, job_id=job_id, rows=values)
                for (job_id, _), file in files.items():
                    job_store.add_artifact(session=session, job_id=job_id, name=file.name,
                                       size=file.size, sha256=file.sha256,
                                       media_type=file.media_type)
                for job_id in changed:
                    progress = self._progress_of(job_id)
                    if job_id == own:
                        job_store.update_progress(session=session, job_id=own, worker_id=worker_id,
                                              progress=progress, message="")
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
