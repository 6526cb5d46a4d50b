"""The dispatcher: claims queued jobs, holds their leases and runs them on Ray.

It runs inside ``metaserve serve`` on the embedded default and standalone as
``metaserve dispatcher``; any number may run against one database, since a claim is
atomic and a job runs only where its lease is held. This is the only server-side module
that imports ``ray``.

Per job: a watch thread renews the lease every ``heartbeat_s`` and looks for a cancel
request every second, a writer thread moves metrics, progress and artifact records to the
database in batches off the training thread, and the training thread runs
:func:`metaserve.workers.runner.run_job`. If this process dies the lease expires and another
dispatcher resumes the job from its last checkpoint with ``attempt + 1``.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqlalchemy.orm import Session, sessionmaker

from metaserve.service import artifacts, jobs
from metaserve.service.exceptions import LeaseLost, MetaserveError
from metaserve.service.models import JobStatus
from metaserve.service.ray_cluster import connect_ray
from metaserve.service.settings import Settings

logger = logging.getLogger(__name__)

POLL_S = 0.5
WATCH_S = 1.0
UNSCHEDULABLE_RETRY_S = 10.0
RAY_CONNECT_RETRY_S = 5.0


def readable_error(error: BaseException) -> str:
    """One line a user can act on, from an exception raised while running a job."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    name = type(error).__name__
    return f"{name}: {first}"[:2000] if first else name


@dataclass
class _Running:
    job_id: str
    thread: threading.Thread
    stop: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)


class _Writer:
    """Moves metrics, progress and artifact records to the database off the training thread."""

    def __init__(self, dispatcher: "Dispatcher", job_id: str, job_dir: Path):
        self.dispatcher, self.job_id, self.job_dir = dispatcher, job_id, job_dir
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"writer-{job_id}", daemon=True)
        self.failure: BaseException | None = None
        self.thread.start()

    def put(self, kind: str, payload: Any) -> None:
        self.queue.put((kind, payload))

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
            try:
                self._write([entry for entry in items if entry is not None])
            except BaseException as error:  # noqa: BLE001 - reported by close()
                logger.exception("writing job records failed", extra={"job_id": self.job_id})
                self.failure = error
            if done:
                return

    def _write(self, items: list[tuple[str, Any]]) -> None:
        rows: list[tuple[int, str, float]] = []
        progress: dict | None = None
        files: dict[str, Path] = {}
        for kind, payload in items:
            if kind == "metrics":
                step, values = payload
                rows.extend((step, name, float(value)) for name, value in values.items())
            elif kind == "progress":
                progress = payload
            elif kind == "files":
                files.update({path.name: path for path in payload})
        job_id, worker_id = self.job_id, self.dispatcher.worker_id
        with self.dispatcher.session_factory() as session:
            if rows:
                jobs.add_metrics(session=session, job_id=job_id, rows=rows)
            for path in files.values():
                described = artifacts.describe(path)
                jobs.add_artifact(session=session, job_id=job_id, name=described.name,
                                  size=described.size, sha256=described.sha256,
                                  media_type=described.media_type)
            if progress is not None:
                jobs.update_progress(session=session, job_id=job_id, worker_id=worker_id,
                                     progress=progress, message="")


class Dispatcher:
    """Claims and runs jobs until :meth:`stop` (see the module docstring)."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], *,
                 worker_id: str | None = None):
        """``worker_id`` names this dispatcher in job leases. A stable one (the embedded
        server's, see :func:`embedded_worker_id`) makes a restarted process take back at once
        the jobs its previous life held, instead of waiting for their leases to lapse."""
        self.settings = settings
        self.session_factory = session_factory
        self.stable_id = worker_id is not None
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[str, _Running] = {}
        self._deferred: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ray_ready = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.stable_id:
            with self.session_factory() as session:
                resumed = jobs.expire_leases(session=session, worker_id=self.worker_id)
            if resumed:
                logger.info("taking back jobs of a previous run", extra={"jobs": resumed})
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, stop the running jobs (their leases lapse: another dispatcher or
        the next start resumes them from their checkpoints) and wait for the threads."""
        self._stop.set()
        for running in list(self._running.values()):
            running.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for running in list(self._running.values()):
            running.thread.join(timeout)

    def run_forever(self) -> None:
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    @property
    def running_jobs(self) -> list[str]:
        return list(self._running)

    # ------------------------------------------------------------------ claim loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                connect_ray(self.settings)
                import metaserve.workers.runner  # noqa: F401 - torch too: the first job starts at once
                self.ray_ready.set()
                break
            except Exception:  # noqa: BLE001 - keep trying; jobs stay queued meanwhile
                logger.exception("cannot connect to Ray; retrying",
                                 extra={"ray_address": self.settings.ray_address})
                self._stop.wait(RAY_CONNECT_RETRY_S)
        while not self._stop.is_set():
            self._reap()
            claimed = False
            if len(self._running) < self.settings.dispatcher_concurrency:
                try:
                    claimed = self._claim_one()
                except Exception:  # noqa: BLE001 - database hiccup: try again next poll
                    logger.exception("claiming a job failed")
            if not claimed:
                self._stop.wait(POLL_S)

    def _reap(self) -> None:
        for job_id, running in list(self._running.items()):
            if not running.thread.is_alive():
                del self._running[job_id]
        now = time.monotonic()
        self._deferred = {job: until for job, until in self._deferred.items() if until > now}

    def _claim_one(self) -> bool:
        with self.session_factory() as session:
            job = jobs.claim_next_job(session=session, worker_id=self.worker_id,
                                      lease_s=self.settings.lease_s,
                                      exclude=list(self._deferred))
            if job is None:
                return False
            job_id, spec, attempt = job.id, dict(job.spec), job.attempt
        logger.info("claimed job", extra={"job_id": job_id, "attempt": attempt})
        running = _Running(job_id=job_id, thread=threading.Thread(
            target=self._execute, args=(job_id, spec), name=f"job-{job_id}", daemon=True))
        self._running[job_id] = running
        running.thread.start()
        return True

    # ------------------------------------------------------------------ one job

    def _watch(self, running: _Running, done: threading.Event) -> None:
        """Renew the lease every ``heartbeat_s``; look for a cancel request every second
        (a plain read); flag a cancel request or a lost lease."""
        renewed = time.monotonic()
        while not done.wait(WATCH_S):
            try:
                with self.session_factory() as session:
                    if time.monotonic() - renewed >= self.settings.heartbeat_s:
                        status = JobStatus(jobs.renew_lease(
                            session=session, job_id=running.job_id, worker_id=self.worker_id,
                            lease_s=self.settings.lease_s).status)
                        renewed = time.monotonic()
                    else:
                        status = jobs.job_status(session=session, job_id=running.job_id)
                if status is JobStatus.CANCELLING:
                    running.stop.set()
            except LeaseLost:
                logger.warning("lease lost", extra={"job_id": running.job_id})
                running.lease_lost.set()
                running.stop.set()
                return
            except Exception:  # noqa: BLE001 - database hiccup: the lease has slack
                logger.exception("lease renewal failed", extra={"job_id": running.job_id})

    def _execute(self, job_id: str, spec: dict) -> None:
        from metaserve.workers.runner import JobCancelled, RunHooks, Unschedulable, run_job

        running = self._running[job_id]
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(running, done),
                                   name=f"watch-{job_id}", daemon=True)
        watcher.start()
        job_dir = artifacts.job_dir(self.settings.artifact_root, job_id)
        writer = _Writer(self, job_id, job_dir)
        hooks = RunHooks(
            report=lambda step, metrics: writer.put("metrics", (step, metrics)),
            progress=lambda progress: writer.put("progress", progress),
            checkpointed=lambda paths: writer.put("files", list(paths)),
            should_stop=running.stop.is_set,
        )
        outcome: tuple[str, str | None]
        try:
            run_job(spec, job_dir, hooks)
            outcome = ("succeeded", None)
        except JobCancelled:
            outcome = ("stopped", None)
        except Unschedulable as reason:
            outcome = ("unschedulable", str(reason))
        except Exception as error:  # noqa: BLE001 - the job's own failure
            logger.exception("job attempt failed", extra={"job_id": job_id})
            outcome = ("failed", readable_error(error))
        try:
            writer.close()
        except Exception as error:  # noqa: BLE001
            if outcome[0] == "succeeded":
                outcome = ("failed", f"could not record the job's results: {readable_error(error)}")
        done.set()
        watcher.join()
        self._settle(running, *outcome)

    def _settle(self, running: _Running, outcome: str, detail: str | None) -> None:
        job_id = running.job_id
        if running.lease_lost.is_set():
            return  # someone else owns the job now
        try:
            with self.session_factory() as session:
                if outcome == "succeeded":
                    jobs.finish_job(session=session, job_id=job_id, worker_id=self.worker_id,
                                    status=JobStatus.SUCCEEDED)
                elif outcome == "stopped":
                    if self._stop.is_set():
                        return  # shutting down: the lease lapses and the job resumes elsewhere
                    jobs.finish_job(session=session, job_id=job_id, worker_id=self.worker_id,
                                    status=JobStatus.CANCELLED)
                elif outcome == "unschedulable":
                    self._deferred[job_id] = time.monotonic() + UNSCHEDULABLE_RETRY_S
                    jobs.release_job(session=session, job_id=job_id, worker_id=self.worker_id,
                                     message=detail or "waiting for resources")
                else:
                    jobs.fail_attempt(session=session, job_id=job_id, worker_id=self.worker_id,
                                      error=detail or "failed")
            logger.info("job settled", extra={"job_id": job_id, "outcome": outcome})
        except (LeaseLost, MetaserveError):
            logger.warning("job changed hands before it settled", extra={"job_id": job_id})


def embedded_worker_id(settings: Settings) -> str:
    """The lease identity of the dispatcher inside ``metaserve serve``: one per host and
    data directory, so a restarted server resumes its own jobs immediately."""
    return f"embedded:{socket.gethostname()}:{Path(settings.data_dir).resolve()}"
