"""The driver of one job, in a Ray actor of its own: one supervisor per job.

This is the shape of Ray's own job manager (``JobSupervisor``): the dispatcher that claimed a
job keeps the claim, the lease, the cancel watch and the database writes, and starts one
:class:`JobSupervisor` actor that runs :func:`metaserve.workers.registry.run_job` (the outer loop,
the dataset, the model and optimizer state, the inner-loop workers it owns). So no job trains in
the API or dispatcher process, the driver gets a ``memory`` request Ray places it by, and a
driver that dies takes only its own job with it.

The supervisor works in a scratch directory on its node: it fetches the job's last checkpoint
from the artifact store before it starts (a resumed job may run on another host than its
previous attempt), runs the job's kind (:mod:`metaserve.workers.registry`: training, or a sweep
whose trials are jobs of their own), publishes every checkpoint and the final artifacts to the
store as they are written, and streams what the job and the jobs it starts report back to the
dispatcher as ``(job_id, kind, payload)`` events (:mod:`metaserve.workers.job_run`) from the
generator :meth:`JobSupervisor.run`.

The run ends when the generator ends; its error (the job's own, :class:`JobCancelled`,
:class:`Unschedulable`) comes out of the generator.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import ray

from metaserve.workers.engine.checkpoints import CHECKPOINT_DIRECTORY
from metaserve.workers.engine.loop import RunHooks
from metaserve.workers.exceptions import (CheckpointError, DriverOutOfMemory, JobCancelled, PlacementTimeout,
                                         Unschedulable)
from metaserve.workers.log_capture import capture_logs, release_logs
from metaserve.workers.job_run import SCRATCH_PREFIX, JobContext, JobRun, node_info
from metaserve.workers.registry import job_kind
from metaserve.workers.runner import (DRIVER_GROUP_PREFIX, PENDING_REPORT_S, RunOptions,
                                     remove_job_placement_groups)
from metaserve.workers.object_store import StorageConfig, open_store

logger = logging.getLogger(__name__)

EVENT_POLL_S = 0.2
SUPERVISOR_READY_TIMEOUT_S = 60.0
WATCH_S = 0.5
OWNER_TIMEOUT_S = 10.0
"""A driver whose dispatcher has not called :meth:`JobSupervisor.heartbeat` for this long is
an orphan (its dispatcher died; Ray may not have reaped it yet): it stops and exits, since the
job's next attempt will run elsewhere."""
ORPHAN_EXIT_S = 30.0


def resident_bytes() -> int:
    """Memory this process alone holds: its anonymous resident pages (Linux). Shared
    library code and the object store's mapped pages (shared with other processes and
    accounted by Ray) are left out; elsewhere the peak resident size from getrusage."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def remove_stale_scratch() -> None:
    """Remove the scratch directories of drivers on this host whose process is gone (a
    killed driver cannot clean up after itself)."""
    for directory in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-p*-*"):
        pid = directory.name.rsplit("-p", 1)[-1].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


class JobSupervisor:
    """Runs one job (see the module docstring). A threaded actor: :meth:`stop`, the heartbeats
    and the calls of the job's remote parts are answered while :meth:`run` works."""

    def __init__(self, run: JobRun, storage: StorageConfig, options: RunOptions):
        self.job, self.options = run, options
        self.job_id, self.memory_bytes = run.job_id, run.memory_bytes
        self.store = open_store(storage)
        self._stop = threading.Event()
        self._stopped_jobs: set[str] = set()  # jobs of this run whose owner cancelled them
        self._out_of_memory: int | None = None  # the resident size that broke the limit
        self._last_heartbeat = time.monotonic()
        self._emitted = 0   # events queued for the dispatcher
        self._recorded = 0  # events the dispatcher has written to the database
        self._events: queue.Queue = queue.Queue()
        self._emit_lock = threading.Lock()

    def event(self, job_id: str, kind: str, payload: Any) -> None:
        """An event of this run (:mod:`metaserve.workers.job_run`), for the dispatcher."""
        with self._emit_lock:
            self._emitted += 1
            self._events.put((job_id, kind, payload))

    def add_logs(self, records: list[dict[str, Any]]) -> None:
        """Log records of an inner-loop worker (:func:`metaserve.workers.log_capture.forward_logs_to`)."""
        self.event(self.job_id, "logs", records)

    def ready(self) -> dict[str, Any]:
        return node_info()

    def stop(self) -> None:
        """Stop the job at its next check (within a meta-iteration or a worker call)."""
        self._stop.set()

    def stop_jobs(self, job_ids: list[str]) -> None:
        """Stop these jobs of the run (a sweep's trials their owner cancelled) at their next
        check; the run goes on."""
        self._stopped_jobs.update(job_ids)

    def should_stop(self, job_id: str) -> bool:
        """Whether the job ``job_id`` of this run must stop."""
        return self._stop.is_set() or job_id in self._stopped_jobs

    def heartbeat(self) -> None:
        """The dispatcher is alive and writing this job's events (called every second)."""
        self._last_heartbeat = time.monotonic()

    def recorded(self, count: int) -> None:
        """The dispatcher has written the first ``count`` events to the database."""
        self._recorded = max(self._recorded, count)

    def wait_recorded(self) -> None:
        """Return once the dispatcher has written every event emitted so far. A checkpoint is
        published only then: a next attempt resumes from it, and must find the metrics up to
        it recorded. An orphan (dispatcher gone) never gets there; :meth:`_watch` stops it."""
        emitted = self._emitted
        while self._recorded < emitted:
            if self._stop.is_set():
                raise JobCancelled()
            time.sleep(EVENT_POLL_S / 4)

    def _watch(self, driver: threading.Thread) -> None:
        """Stop the job when this process holds more than its ``memory`` request (Ray's
        request is only bookkeeping, and one job must not take its node's memory), or when
        its dispatcher stopped calling :meth:`heartbeat` (then exit: an orphan)."""
        while driver.is_alive():
            used = resident_bytes()
            if used > self.memory_bytes:
                self._out_of_memory = used
                self._stop.set()
                return
            if time.monotonic() - self._last_heartbeat > OWNER_TIMEOUT_S:
                logger.warning("no heartbeat from the dispatcher; stopping the orphaned job",
                               extra={"job_id": self.job_id})
                self._stop.set()
                driver.join(ORPHAN_EXIT_S)
                os._exit(1)
            time.sleep(WATCH_S)

    def run(self) -> Iterator[tuple[str, str, Any]]:
        """Run the job to its end, yielding its events (see the module docstring)."""
        self._last_heartbeat = time.monotonic()  # the dispatcher starts calling now
        job_id, events = self.job_id, self._events
        kind = job_kind(self.job)
        driver = node_info()
        log_handler = capture_logs(lambda records: self.event(job_id, "logs", records),
                                   f"driver pid {driver['pid']}")
        this_actor = ray.get_runtime_context().current_actor
        # Inner-loop workers send their records to this actor (add_logs).
        options = replace(self.options, log_sink=this_actor)

        def placement(workers: list[dict]) -> None:
            self.event(job_id, "placement", {"driver": driver, "workers": workers})

        def checkpointed(paths: list[Path]) -> None:
            self.wait_recorded()
            self.event(job_id, "files", self.store.put(job_id, list(paths), attempt=self.job.fence))

        context = JobContext(
            hooks=RunHooks(report=lambda step, metrics: self.event(job_id, "metrics",
                                                                   (step, metrics)),
                           progress=lambda progress: self.event(job_id, "progress", progress),
                           checkpointed=checkpointed, should_stop=self._stop.is_set,
                           workers_ready=placement),
            options=options, emit=self.event, store=self.store, supervisor=this_actor)
        remove_stale_scratch()
        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{job_id}-p{os.getpid()}-"))
        failure: list[BaseException] = []

        def drive() -> None:
            try:
                self.store.fetch_checkpoint(job_id, scratch / CHECKPOINT_DIRECTORY)
                kind.run(self.job, scratch, context)
            except CheckpointError as error:  # name the checkpoint where the user finds it
                failure.append(CheckpointError(str(error).replace(
                    str(scratch / CHECKPOINT_DIRECTORY), self.store.checkpoint_location(job_id))))
            except BaseException as error:  # noqa: BLE001 - re-raised by the generator below
                failure.append(error)
            finally:
                if failure and not isinstance(failure[0], JobCancelled):
                    # The whole traceback (an inner-loop worker's too: Ray's error carries it)
                    # goes to the job's log; the job's error stays one line.
                    logger.error("the job's attempt failed", exc_info=failure[0])
                log_handler.flush()  # before this thread ends: run() drains the queue after

        placement([])
        thread = threading.Thread(target=drive, name=f"driver-{job_id}", daemon=True)
        thread.start()
        threading.Thread(target=self._watch, args=(thread,), daemon=True,
                         name=f"watch-{job_id}").start()
        try:
            while thread.is_alive() or not events.empty():
                try:
                    yield events.get(timeout=EVENT_POLL_S)
                except queue.Empty:
                    continue
            if self._out_of_memory is not None:
                raise DriverOutOfMemory(
                    f"out of memory: the job's driver held {self._out_of_memory / 2**20:.0f} MiB, "
                    f"more than the {self.memory_bytes / 2**20:.0f} MiB it asked for")
            if failure:
                raise failure[0]
        finally:
            self._stop.set()
            thread.join()
            release_logs(log_handler)
            shutil.rmtree(scratch, ignore_errors=True)


SUPERVISOR_NAMESPACE = "metaserve"
PREVIOUS_SUPERVISOR_EXIT_S = 30.0


def supervisor_name(job_id: str) -> str:
    """The Ray actor name (in :data:`SUPERVISOR_NAMESPACE`) of the supervisor of ``job_id``."""
    return f"metaserve-job-{job_id}"


def _end_previous_supervisor(name: str) -> None:
    """Kill the detached supervisor called ``name`` if one still runs (the previous attempt's,
    whose dispatcher died), and wait until it is gone."""
    deadline = time.monotonic() + PREVIOUS_SUPERVISOR_EXIT_S
    while time.monotonic() < deadline:
        try:
            previous = ray.get_actor(name, namespace=SUPERVISOR_NAMESPACE)
        except ValueError:
            return
        ray.kill(previous)
        time.sleep(0.2)
    raise RuntimeError(f"the previous supervisor {name} did not end within "
                       f"{PREVIOUS_SUPERVISOR_EXIT_S:.0f} s")


def start_supervisor(run: JobRun, storage: StorageConfig, options: RunOptions, *,
                     should_stop: Callable[[], bool] = lambda: False,
                     waiting: Callable[[str], None] = lambda reason: None):
    """Start the :class:`JobSupervisor` of ``run`` on the cluster and wait until it runs.

    Raises :class:`Unschedulable` when no node can ever give it ``run.memory_bytes`` or it is
    not placed within :data:`SUPERVISOR_READY_TIMEOUT_S`, and :class:`JobCancelled` when
    ``should_stop()`` turns true meanwhile. On an autoscaling cluster
    (``options.autoscaling``) nothing is vetoed against the current nodes: the driver's
    request stays pending (``waiting(reason)`` is told once, for the job's progress) until a
    node fits it or ``options.pending_timeout_s`` passes (:class:`PlacementTimeout`).
    """
    memory_bytes = run.memory_bytes
    if not options.autoscaling:
        largest = max((node.get("Resources", {}).get("memory", 0.0) for node in ray.nodes()
                       if node.get("Alive")), default=0.0)
        if memory_bytes > largest:
            raise Unschedulable(
                f"waiting for resources: the job's driver asks {memory_bytes / 2**30:.2f} GiB of "
                f"memory, the largest node offers {largest / 2**30:.2f} GiB")
    # One supervisor per job: named for the job, so a new attempt first ends a previous one
    # that may still run (its dispatcher lost the lease but not its Ray connection: paused,
    # partitioned from the database) before it starts; two supervisors never run one job.
    name = supervisor_name(run.job_id)
    _end_previous_supervisor(name)
    # and its placement groups (named after it), which outlive it; its dispatcher leaves them
    # when it lost the lease, since by then they may be this attempt's.
    remove_job_placement_groups(name)
    placement: dict[str, Any] = dict(name=name, namespace=SUPERVISOR_NAMESPACE)
    if job_kind(run).detached:
        # Tune reserves a placement group per trial from inside this actor, and a placement
        # group made by an ordinary actor lives as long as the *dispatcher's* Ray job, so a
        # killed sweep (cancel, dispatcher death) left its trials' CPUs reserved; a detached
        # actor's placement groups are removed when it dies. It still dies with its
        # dispatcher: the orphan watchdog ends a supervisor whose heartbeats stop.
        placement["lifetime"] = "detached"
    group = None
    if options.autoscaling:
        # Ray schedules an actor's own `memory` request without checking it against the
        # nodes (Ray 2.60: a 1 PiB driver starts at once on a 15 GiB node), and the
        # autoscaler sees no demand from it; a placement group's bundle is both checked and
        # reported as demand. Named after the supervisor, so that the dispatcher removes it
        # with the workers' groups (runner.remove_job_placement_groups) when it ends the job.
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"memory": float(memory_bytes)}],
                                name=f"{DRIVER_GROUP_PREFIX}{name}")
        placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0)
    # num_cpus=0: the driver's own arithmetic is the outer step; its inner-loop workers (a
    # sweep's trials) hold the CPUs. Threaded: stop(), heartbeat(), recorded(), add_logs()
    # and the calls of a sweep's trials are answered while run() works.
    actor = ray.remote(JobSupervisor).options(
        num_cpus=0, memory=memory_bytes, max_restarts=0, max_concurrency=32, **placement,
    ).remote(run, storage, options)
    ready = actor.ready.remote()
    timeout = options.pending_timeout_s if options.autoscaling else SUPERVISOR_READY_TIMEOUT_S
    started, reported = time.monotonic(), False
    try:
        while not ray.wait([ready], timeout=EVENT_POLL_S)[0]:
            if should_stop():
                raise JobCancelled()
            waited = time.monotonic() - started
            if options.autoscaling and not reported and waited > PENDING_REPORT_S:
                # Only here: elsewhere a driver not yet ready is mostly a process starting
                # on a busy host, and it is refused (or given up on) anyway.
                reported = True
                waiting(f"waiting for placement: the job's driver "
                        f"({memory_bytes / 2**30:.2f} GiB of memory)")
            if waited > timeout:
                if options.autoscaling:
                    raise PlacementTimeout(
                        f"no placement for the job's driver ({memory_bytes / 2**30:.2f} GiB of "
                        f"memory) within the pending timeout of {timeout:.0f} s "
                        "(placement_pending_timeout_s): the cluster did not scale up to fit it")
                raise Unschedulable(
                    f"waiting for resources: the job's driver ({memory_bytes / 2**30:.2f} GiB "
                    f"of memory) could not be placed within {timeout:.0f} s")
        ray.get(ready)
    except BaseException:
        ray.kill(actor)
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
        raise
    return actor
