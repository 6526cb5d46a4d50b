"""The dispatcher: claims queued jobs, holds their leases and runs them on Ray.

It runs inside ``metaserve serve`` on the embedded default and standalone as
``metaserve dispatcher``; any number may run against one database, since a claim is
atomic and a job runs only where its lease is held. This is the only server-side module
that imports ``ray``.

Per dispatcher, one keeper thread holds the leases of all its jobs: every ``heartbeat_s``
one statement renews them all, and every other second one read looks for cancel requests
and lost leases of them all (docs/RELIABILITY.md, "Control plane": statements per running
job fall with the jobs per dispatcher). Per job: a writer thread moves the events of the job (and of the jobs it starts:
a sweep's trials) to the database in batches off the training thread, and the job's thread
runs its :class:`~metaserve.workers.supervisor.JobSupervisor` actor, whatever the job's kind
(:mod:`metaserve.workers.registry`). If this process dies the lease expires and another
dispatcher resumes the job from its last checkpoint, counting an interruption, not an
attempt: ``attempt`` counts the job's own failures only.

Fenced: every write of an attempt (its events, lease renewals, its settling) is guarded by
(job, lease owner, attempt, an active status) in its own statement or transaction, so an
attempt that lost its lease writes nothing. Database errors are retried (the writer's
batches, the settling) rather than failing the attempt. :meth:`Dispatcher.drain` (SIGTERM on
``metaserve dispatcher`` and ``metaserve serve``) stops claiming, stops the running jobs and
hands them back (``interruptions + 1``, attempt unchanged) within a bounded grace; they resume
from their last checkpoint wherever they are claimed next.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from metaserve.service import (child_jobs, claims, job_runs, job_store, metrics_retention,
                               telemetry)
from metaserve.service.exceptions import LeaseLost, MetaserveError
from metaserve.service.orm import JobStatus
from metaserve.service.ray_cluster import connect_ray, ray_connection_alive
from metaserve.service.run_events import RunEventWriter, backoff, transient
from metaserve.service.settings import Settings
from metaserve.workers.job_run import JobRun
from metaserve.workers.object_store import AttemptFenced, StorageError

logger = logging.getLogger(__name__)

POLL_S = 0.5
WATCH_S = 1.0
UNSCHEDULABLE_RETRY_S = 10.0
STOP_GRACE_S = 5.0
SUPERVISOR_HEARTBEAT_S = 1.0  # well under workers.supervisor.OWNER_TIMEOUT_S
HEALTH_WRITE_S = 2.0
EVENT_POLL_S = 0.25
RAY_CONNECT_RETRY_S = 5.0


class Outcome(str, Enum):
    """How one attempt of a job ended, as the dispatcher settles it."""

    SUCCEEDED = "succeeded"
    STOPPED = "stopped"              # cancelled, or this dispatcher is shutting down
    INTERRUPTED = "interrupted"      # handed back (drain): interruptions + 1, attempt not counted
    UNSCHEDULABLE = "unschedulable"  # back to queued with the reason, attempt not counted
                                     # (no resources, the artifact store down)
    RETRY = "retry"                  # a transient failure: the next attempt may succeed
    FAILED = "failed"                # the job's own error: the same on every attempt


# Errors of the job itself that no retry can change: a bad spec, dataset or checkpoint.
# MemoryError: the driver outgrew its memory request (it would again).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, LookupError,
                                                     FileNotFoundError, MemoryError)


def classify_job_error(error: BaseException) -> tuple[Outcome, str]:
    """A job's own error: fail at once when retrying cannot help, else retry. An artifact
    store that does not answer is no fault of the job: it waits queued (attempt not counted)
    and resumes from its last checkpoint once the store is back."""
    if isinstance(error, StorageError):
        return Outcome.UNSCHEDULABLE, f"waiting for the artifact store: {error}"
    if isinstance(error, PERMANENT_ERRORS):
        return Outcome.FAILED, readable_error(error)
    return Outcome.RETRY, readable_error(error)


def classify_driver_death(error: BaseException) -> tuple[Outcome, str]:
    """The job's driver process died: out of memory fails the job (it would again), anything
    else (node lost, process killed) is retried from the last checkpoint."""
    text = str(error)
    if "memory" in text.lower() and ("OutOfMemory" in text or "memory monitor" in text):
        return Outcome.FAILED, "out of memory: the job's driver was killed by Ray's memory monitor"
    return Outcome.RETRY, "the job's driver died (node lost or process killed); resuming " \
                          "from the last checkpoint"


def _cause(error: BaseException) -> BaseException:
    """The exception raised in a Ray actor, without Ray's wrappers (and their traceback text):
    an inner-loop worker's error reaches here wrapped twice (worker, then driver)."""
    for _ in range(8):
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException) or cause is error:
            break
        error = cause
    return error


def readable_error(error: BaseException) -> str:
    """One line a user can act on, from an exception raised while running a job."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    name = type(error).__name__
    return f"{name}: {first}"[:2000] if first else name


@dataclass
class _Running:
    run: JobRun
    thread: threading.Thread
    stop: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    settling: threading.Event = field(default_factory=threading.Event)  # its end is written
    children: set[str] = field(default_factory=set)  # jobs it started (a sweep's trials)
    cancelling_children: frozenset[str] = frozenset()  # of those, the ones asked to stop
    renewed_at: float = field(default_factory=time.time)  # the lease's last renewal (or claim)

    @property
    def job_id(self) -> str:
        return self.run.job_id


class Dispatcher:
    """Claims and runs jobs until :meth:`stop` (see the module docstring)."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], *,
                 worker_id: str | None = None, health_path: Path | None = None):
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
        self.health_path = health_path
        self._health_written = 0.0
        self._database_ok_at = 0.0  # wall-clock times of the last success, for the report
        self._ray_ok_at = 0.0
        self._ray_state = "not connected to Ray yet"
        self._draining = threading.Event()
        self._settle_deadline: float | None = None  # monotonic; set by drain()
        self._keeper: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.stable_id:
            with self.session_factory.begin() as session:
                resumed = job_store.expire_leases(session=session, worker_id=self.worker_id)
            if resumed:
                logger.info("taking back jobs of a previous run", extra={"jobs": resumed})
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()
        self._keeper = threading.Thread(target=self._keep_leases, name="leases", daemon=True)
        self._keeper.start()
        threading.Thread(target=self._retain_metrics, name="metrics-retention",
                         daemon=True).start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop: :meth:`drain` within ``timeout`` (default METASERVE_DRAIN_GRACE_S): the
        running jobs are handed back and resume from their checkpoints wherever they are
        claimed next (a job not handed back in time keeps its lease until it lapses)."""
        self.drain(self.settings.drain_grace_s if timeout is None else timeout)

    def drain(self, grace_s: float) -> list[str]:
        """Stop claiming, stop every running job and hand it back (queued again,
        ``interruptions + 1``, its attempt not counted) so that it resumes from its last
        checkpoint wherever it is claimed next; return within about ``grace_s`` seconds. A
        job not settled by then keeps its lease, which lapses (a reclaim counts an
        interruption too). Returns the ids of the jobs that were running."""
        # Ray's core worker (absl's failure signal handler) answers SIGTERM by dumping a
        # stack and arming alarm(3): SIGALRM would kill the process 3 s into the drain.
        signal.alarm(0)
        deadline = time.monotonic() + grace_s
        self._settle_deadline = deadline
        self._draining.set()
        self._stop.set()
        running = list(self._running.values())
        logger.info("draining", extra={"jobs": [item.job_id for item in running],
                                       "grace_s": grace_s})
        for item in running:
            item.stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for item in running:
            item.thread.join(max(0.0, deadline - time.monotonic()))
        return [item.job_id for item in running]

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then :meth:`drain` (METASERVE_DRAIN_GRACE_S)."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(1.0)
        except KeyboardInterrupt:
            logger.info("signalled: draining", extra={"grace_s": self.settings.drain_grace_s})
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM: the drain goes on
            try:
                if not self._draining.is_set():
                    self.stop()
            finally:
                signal.signal(signal.SIGTERM, previous)

    def running_jobs(self) -> list[str]:
        return list(self._running)

    # ------------------------------------------------------------------ claim loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                connect_ray(self.settings)
                import metaserve.workers.cost  # noqa: F401 - the first job starts at once
                import metaserve.workers.supervisor  # noqa: F401
                self.ray_ready.set()
                break
            except Exception:  # noqa: BLE001 - keep trying; jobs stay queued meanwhile
                logger.exception("cannot connect to Ray; retrying",
                                 extra={"ray_address": self.settings.ray_address})
                self._stop.wait(RAY_CONNECT_RETRY_S)
        while not self._stop.is_set():
            self._reap()
            claimed = False
            try:
                if len(self._running) < self.settings.dispatcher_concurrency:
                    claimed = self._claim_one()
                    self._database_ok_at = time.time()
                # at capacity the lease keeper's statements say the database answers
            except Exception:  # noqa: BLE001 - database hiccup: try again next poll
                logger.exception("claiming a job failed")
            self._report_health()
            if not claimed:
                self._stop.wait(POLL_S)

    def _report_health(self) -> None:
        """Write what :func:`dispatcher_healthy` judges to ``health_path`` (read by
        ``metaserve dispatcher --health``), every ``HEALTH_WRITE_S`` whatever failed: when
        the claim loop last reached the database, when Ray last answered (a probe of the
        GCS, made here), and when each running job's lease was last renewed."""
        if self.health_path is None:
            return
        now = time.time()
        if now - self._health_written < HEALTH_WRITE_S:
            return
        ray_ok, self._ray_state = ray_connection_alive()
        now = time.time()
        if ray_ok:
            self._ray_ok_at = now
        self.health_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.health_path.with_name(f".{self.health_path.name}.tmp")
        temporary.write_text(json.dumps({
            "worker_id": self.worker_id, "time": now, "running": sorted(self._running),
            "database_ok_at": self._database_ok_at, "ray_ok_at": self._ray_ok_at,
            "ray": self._ray_state,
            "lease_renewed_at": {job_id: running.renewed_at
                                 for job_id, running in list(self._running.items())}}))
        os.replace(temporary, self.health_path)
        self._health_written = now

    def _reap(self) -> None:
        for job_id, running in list(self._running.items()):
            if not running.thread.is_alive():
                del self._running[job_id]
        now = time.monotonic()
        self._deferred = {job: until for job, until in self._deferred.items() if until > now}

    def _claim_one(self) -> bool:
        # Never a job this dispatcher still supervises, even if its lease lapsed (the
        # database was away): its supervisor still runs it, and renews the lease once the
        # database is back. Another dispatcher may take it over; the fence stops this one.
        with self.session_factory.begin() as session:  # the claim commits on its own
            job = claims.claim_next_job(
                session=session, worker_id=self.worker_id, lease_s=self.settings.lease_s,
                exclude=[*self._deferred, *self._running],
                max_running_per_user=self.settings.max_running_jobs_per_user)
        if job is None:
            return False
        if job.id in self._running:  # cannot happen (excluded above); never run it twice
            logger.error("claimed a job this dispatcher runs", extra={"job_id": job.id})
            return False
        try:
            with self.session_factory() as session:  # reads only
                run = job_runs.job_run(session=session, job=job, settings=self.settings)
        except ValueError as error:  # a stored spec this engine cannot read: no retry helps
            with self.session_factory.begin() as session:
                job_store.fail_attempt(session=session, job_id=job.id, worker_id=self.worker_id,
                                       error=f"the stored spec is not a valid job: "
                                             f"{readable_error(error)}", retry=False)
            return True
        logger.info("claimed job", extra={"job_id": run.job_id, "attempt": run.attempt})
        if (job.message or "").startswith("reclaimed after"):  # claims._reclaim's message
            telemetry.LEASE_EXPIRIES.inc()
        running = _Running(run=run, thread=threading.Thread(
            target=self._execute, args=(run.job_id,), name=f"job-{run.job_id}", daemon=True))
        self._running[run.job_id] = running
        running.thread.start()
        return True

    # ------------------------------------------------------------------ one job

    def _keep_leases(self) -> None:
        """The leases of every job this dispatcher runs, held in batches until it stops and
        its jobs are settled: every ``heartbeat_s`` one ``UPDATE`` renews them all
        (:func:`~metaserve.service.job_store.renew_leases`); in the seconds between, one read
        (:func:`~metaserve.service.job_store.held_statuses`) finds cancel requests and lost
        leases. A job missing from either lost its lease: it is stopped (its writes are
        fenced anyway). A database error is logged and retried a second later: the lease
        has slack."""
        renewed = time.monotonic()
        while True:
            time.sleep(WATCH_S)
            alive = {job_id: item for job_id, item in list(self._running.items())
                     if item.thread.is_alive()}
            if self._stop.is_set() and not alive:
                return  # stopped, and every job settled (or handed back)
            running = {job_id: item for job_id, item in alive.items()
                       if not item.lease_lost.is_set()}
            if not running:
                continue
            attempts = {job_id: item.run.attempt for job_id, item in running.items()}
            try:
                with self.session_factory.begin() as session:
                    renewing = time.monotonic() - renewed >= self.settings.heartbeat_s
                    if renewing:
                        held = job_store.renew_leases(
                            session=session, worker_id=self.worker_id, attempts=attempts,
                            lease_s=self.settings.lease_s)
                    else:
                        held = job_store.held_statuses(session=session, worker_id=self.worker_id,
                                                       attempts=attempts)
                    for item in running.values():  # jobs they started whose owner cancelled them
                        if item.children and item.job_id in held:
                            item.cancelling_children = frozenset(child_jobs.cancelling_children(
                                session=session, parent_job_id=item.job_id))
            except Exception:  # noqa: BLE001 - database hiccup: the lease has slack
                logger.exception("lease renewal failed", extra={"jobs": sorted(attempts)})
                telemetry.LEASE_RENEWAL_FAILURES.inc()
                continue
            self._database_ok_at = time.time()
            if renewing:
                renewed = time.monotonic()
                telemetry.LEASE_RENEWALS.inc(len(held))
            for job_id, item in running.items():
                status = held.get(job_id)
                if status is None:
                    if self._running.get(job_id) is item and not item.settling.is_set():
                        logger.warning("lease lost", extra={"job_id": job_id})
                        telemetry.LEASES_LOST.inc()
                        item.lease_lost.set()
                        item.stop.set()
                    continue
                if renewing:
                    item.renewed_at = time.time()
                if status == JobStatus.CANCELLING.value:
                    item.stop.set()

    def _retain_metrics(self) -> None:
        """Downsample finished jobs' metrics every METASERVE_METRICS_RETENTION_INTERVAL_S
        until stopped (:func:`~metaserve.service.metrics_retention.keep_downsampling`)."""
        metrics_retention.keep_downsampling(self.session_factory, self.settings, self._stop)

    def _execute(self, job_id: str) -> None:
        running = self._running[job_id]
        writer = RunEventWriter(self.session_factory, self.worker_id, job_id,
                                running.run.attempt, running.children,
                                lease_s=self.settings.lease_s)
        outcome, detail = self._supervise(running, writer)
        if outcome is Outcome.STOPPED and self._draining.is_set() \
                and not running.lease_lost.is_set():
            outcome, detail = Outcome.INTERRUPTED, "handed back: its dispatcher is draining " \
                                                   "(resumes from its last checkpoint)"
        if outcome in (Outcome.FAILED, Outcome.RETRY, Outcome.INTERRUPTED):
            writer.log("ERROR" if outcome is not Outcome.INTERRUPTED else "WARNING",
                       f"attempt {running.run.attempt} {outcome.value}: {detail}")
        try:
            writer.close(self._time_left())
        except Exception as error:  # noqa: BLE001
            if outcome is Outcome.SUCCEEDED:
                outcome = Outcome.RETRY
                detail = f"could not record the job's results: {readable_error(error)}"
        if writer.lease_lost.is_set():
            running.lease_lost.set()
            logger.warning("attempt fenced: %d of its writes were refused", writer.refused,
                           extra={"job_id": job_id, "attempt": running.run.attempt,
                                  "refused": writer.refused})
        running.settling.set()  # the keeper no longer takes a missing lease for a lost one
        self._settle(running, outcome, detail)

    def _time_left(self) -> float | None:
        """Seconds left of a drain's grace (None: not draining)."""
        if self._settle_deadline is None:
            return None
        return max(0.0, self._settle_deadline - time.monotonic())

    def _supervise(self, running: _Running, writer: RunEventWriter) -> tuple["Outcome", str | None]:
        """Run the job in its supervisor actor, forwarding its events to ``writer``, until it
        ends or ``running.stop`` is set (cancel, lost lease, shutdown)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from metaserve.workers.exceptions import JobCancelled, Unschedulable
        from metaserve.workers.registry import job_kind
        from metaserve.workers.supervisor import start_supervisor

        run, supervisor = running.run, None
        try:
            supervisor = start_supervisor(
                run, self.settings.storage_config(), self._run_options(), should_stop=running.stop.is_set,
                waiting=lambda reason: writer.put(run.job_id, "progress", {"waiting": reason}))
            writer.log("INFO", f"attempt {run.attempt} started (dispatcher {self.worker_id})")
            runtime_limit = run.spec.max_runtime_s or self.settings.max_runtime_s
            stops_at_once = job_kind(run).stops_at_once
            started = time.monotonic()
            writer.on_written = supervisor.recorded.remote
            events = supervisor.run.remote()
            stop_requested_at: float | None = None
            stopped_children: frozenset[str] = frozenset()
            heartbeat_at = 0.0
            while True:
                if time.monotonic() - started > runtime_limit:
                    return Outcome.FAILED, (f"ran longer than its max_runtime_s of "
                                            f"{runtime_limit:,} s; stopped")
                if time.monotonic() - heartbeat_at >= SUPERVISOR_HEARTBEAT_S:
                    supervisor.heartbeat.remote()
                    heartbeat_at = time.monotonic()
                if running.stop.is_set():
                    if stops_at_once:  # killed by the finally below (registry.JobKind says why)
                        return Outcome.STOPPED, None
                    if stop_requested_at is None:
                        stop_requested_at = time.monotonic()
                        supervisor.stop.remote()
                    elif time.monotonic() - stop_requested_at > STOP_GRACE_S:
                        return Outcome.STOPPED, None  # the finally below kills the driver
                if writer.lease_lost.is_set():  # fenced: another attempt holds the job now
                    running.lease_lost.set()
                    return Outcome.STOPPED, None
                if writer.failure is not None:  # the driver would wait for it forever
                    return Outcome.RETRY, ("could not record the job's events: "
                                           f"{readable_error(writer.failure)}")
                if running.cancelling_children - stopped_children:
                    stopped_children = running.cancelling_children
                    supervisor.stop_jobs.remote(sorted(stopped_children))
                ready, _ = ray.wait([events], timeout=EVENT_POLL_S)
                if not ready:
                    continue
                try:
                    ref = next(events)
                except StopIteration:
                    return Outcome.SUCCEEDED, None
                writer.put(*ray.get(ref))
        except JobCancelled:
            return Outcome.STOPPED, None
        except Unschedulable as reason:
            return Outcome.UNSCHEDULABLE, str(_cause(reason))
        except RayActorError as error:
            if running.stop.is_set():
                return Outcome.STOPPED, None
            return classify_driver_death(error)
        except RayTaskError as error:  # the job's own error, raised in its driver
            if isinstance(_cause(error), AttemptFenced):
                # The artifact store holds a newer attempt's manifest: this attempt lost the
                # job (its lease lapsed and another took it). Nothing to settle or release.
                logger.warning("attempt fenced by the artifact store",
                               extra={"job_id": running.job_id})
                running.lease_lost.set()
                return Outcome.STOPPED, None
            logger.warning("job attempt failed", extra={"job_id": running.job_id})
            return classify_job_error(_cause(error))
        except Exception as error:  # noqa: BLE001 - e.g. the driver could not be started
            logger.exception("job attempt failed", extra={"job_id": running.job_id})
            return classify_job_error(error)
        finally:
            if supervisor is not None:
                try:
                    ray.kill(supervisor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                # The workers' placement group outlives a killed supervisor until this
                # process's Ray job ends; a stopping dispatcher's ends with it. So stopping,
                # the GCS call is skipped: after a SIGTERM it blocked a drain's handback past
                # the grace (20 s in CI, the job left to its lapsing lease).
                if not self._stop.is_set():
                    self._remove_placement_groups(running)

    def _remove_placement_groups(self, running: _Running) -> None:
        job_id = running.job_id
        if running.lease_lost.is_set() \
                or time.time() - running.renewed_at > self.settings.lease_s / 2:
            # The job may be another attempt's by now (this one was paused or cut off past its
            # lease): the groups named after its supervisor may be the new attempt's workers'.
            # The next attempt removes this one's before it starts (start_supervisor).
            logger.warning("lease lost or not renewed lately: the job's placement groups are "
                           "left to its next attempt", extra={"job_id": job_id})
            return
        try:
            from metaserve.workers.runner import remove_job_placement_groups
            from metaserve.workers.supervisor import supervisor_name

            remove_job_placement_groups(supervisor_name(job_id))
        except Exception:  # noqa: BLE001 - Ray gone: its groups went with it
            logger.exception("could not remove the job's placement groups",
                             extra={"job_id": job_id})

    def _run_options(self):  # noqa: ANN202 - a workers.runner.RunOptions
        from metaserve.workers.runner import RunOptions

        return RunOptions(gpu_resource=self.settings.gpu_resource,
                          storage=self.settings.storage_config(),
                          autoscaling=self.settings.cluster_autoscaling,
                          pending_timeout_s=self.settings.placement_pending_timeout_s)

    def _settle(self, running: _Running, outcome: "Outcome", detail: str | None) -> None:
        """Write how the attempt ended, fenced by its attempt; a database error is retried
        (:func:`~metaserve.service.run_events.backoff`) for up to a lease, or a drain's
        grace: past that the lease lapses and a reclaim resumes the job (an interruption)."""
        job_id = running.job_id
        if running.lease_lost.is_set():
            return  # someone else owns the job now
        if outcome is Outcome.STOPPED and self._stop.is_set():
            return  # shutting down (not a drain): the lease lapses, the job resumes elsewhere
        left = self._time_left()
        deadline = time.monotonic() + (self.settings.lease_s if left is None else left)
        waits = backoff(self.settings.lease_s)
        while True:
            try:
                with self.session_factory.begin() as session:
                    self._settle_in(session, running, outcome, detail)
                logger.info("job settled", extra={"job_id": job_id, "outcome": outcome.value})
                return
            except (LeaseLost, MetaserveError):
                logger.warning("job changed hands before it settled", extra={"job_id": job_id})
                return
            except Exception as error:
                wait = next(waits)
                if not transient(error) or time.monotonic() + wait > deadline:
                    logger.exception("could not settle the job; its lease will lapse",
                                     extra={"job_id": job_id, "outcome": outcome.value})
                    return
                logger.warning("settling the job failed; retrying in %.2f s", wait,
                               extra={"job_id": job_id, "error": str(error)[:200]})
                telemetry.DATABASE_RETRIES.inc()
                time.sleep(wait)

    def _settle_in(self, session: Session, running: _Running, outcome: "Outcome",
                   detail: str | None) -> None:
        job_id, attempt, worker_id = running.job_id, running.run.attempt, self.worker_id
        if outcome is Outcome.SUCCEEDED:
            job_store.finish_job(session=session, job_id=job_id, worker_id=worker_id,
                                 status=JobStatus.SUCCEEDED, attempt=attempt)
        elif outcome is Outcome.STOPPED:
            job_store.finish_job(session=session, job_id=job_id, worker_id=worker_id,
                                 status=JobStatus.CANCELLED, attempt=attempt)
        elif outcome is Outcome.INTERRUPTED:
            try:
                job_store.release_job(session=session, job_id=job_id, worker_id=worker_id,
                                      message=detail or "handed back", attempt=attempt,
                                      interrupted=True)
            except LeaseLost:  # cancelled meanwhile (cancelling: not handed back): cancel it
                job_store.finish_job(session=session, job_id=job_id, worker_id=worker_id,
                                     status=JobStatus.CANCELLED, attempt=attempt)
        elif outcome is Outcome.UNSCHEDULABLE:
            self._deferred[job_id] = time.monotonic() + UNSCHEDULABLE_RETRY_S
            job_store.release_job(session=session, job_id=job_id, worker_id=worker_id,
                                  message=detail or "waiting for resources", attempt=attempt)
        else:
            job_store.fail_attempt(session=session, job_id=job_id, worker_id=worker_id,
                                   error=detail or "failed", retry=outcome is Outcome.RETRY,
                                   attempt=attempt)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def embedded_worker_id(settings: Settings) -> str:
    """The lease identity of the dispatcher inside ``metaserve serve``: one per host and
    data directory, so a restarted server resumes its own jobs immediately."""
    return f"embedded:{socket.gethostname()}:{Path(settings.data_dir).resolve()}"


def dispatcher_healthy(health_path: Path, max_age_s: float) -> tuple[bool, str]:
    """Whether the dispatcher writing ``health_path`` is doing its work, judged from its
    report (:meth:`Dispatcher._report_health`), and a line saying why not: the report is
    fresh (its claim loop runs), its database and Ray connections answered within
    ``max_age_s`` and every running job's lease was renewed within ``max_age_s`` (the lease
    length: a lease older than that has lapsed and another dispatcher may take the job)."""
    try:
        report = json.loads(Path(health_path).read_text())
    except (OSError, ValueError):
        return False, f"no health report at {health_path} (not connected to Ray and the database yet)"
    now = time.time()
    age = now - float(report.get("time", 0))
    if age > max_age_s:
        return False, f"last health report {age:.0f} s ago (more than {max_age_s:.0f} s)"
    since_database = now - float(report.get("database_ok_at", 0))
    if since_database > max_age_s:
        return False, f"the database has not answered for {min(since_database, 1e6):.0f} s"
    since_ray = now - float(report.get("ray_ok_at", 0))
    if since_ray > max_age_s:
        return False, f"Ray has not answered for {min(since_ray, 1e6):.0f} s: {report.get('ray')}"
    renewals = report.get("lease_renewed_at") or {}
    stale = {job_id: now - float(at) for job_id, at in renewals.items() if now - float(at) > max_age_s}
    if stale:
        job_id, since = max(stale.items(), key=lambda item: item[1])
        return False, (f"the lease of job {job_id} was last renewed {since:.0f} s ago "
                       f"({len(stale)} job(s) past {max_age_s:.0f} s)")
    return True, (f"ok: {report.get('worker_id')} running {len(report.get('running', []))} "
                  f"job(s), leases renewed")
