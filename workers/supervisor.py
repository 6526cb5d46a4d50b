"""The driver of one job, in a Ray actor of its own: one supervisor per job.

This is the shape of Ray's own job manager (``JobSupervisor``): the dispatcher that claimed a
job keeps the claim, the lease, the cancel watch and the database writes, and starts one
:class:`JobSupervisor` actor that runs :func:`metaserve.workers.registry.run_job` (the outer loop,
the dataset, the model and optimizer state, the inner-loop workers it owns). So no job trains in
the API or dispatcher process, the driver gets a ``memory`` request Ray places it by, and a
driver that dies takes only its own job with it.

The supervisor works in a scratch directory on its node: it fetches the job's last checkpoint
from the artifact store before it starts (a resumed job may run on another host than its
previous attempt), publishes every checkpoint and the final artifacts to the store as they are
written, and streams what the job reports back to the dispatcher as ``(kind, payload)`` events
from the generator :meth:`JobSupervisor.run`:

- ``("metrics", (step, {name: value}))``, ``("progress", {...})``
- ``("files", [ArtifactFile, ...])``: published, to be registered in the database
- ``("placement", {"driver": {...}, "workers": [{...}, ...]})``: node, pid and device of the
  driver and of every inner-loop worker, whenever the workers change.
- ``("logs", [record, ...])``: log records of the driver and of its inner-loop workers
  (:mod:`metaserve.workers.log_capture`), the job's error with its traceback among them.

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
from metaserve.workers.exceptions import CheckpointError, DriverOutOfMemory, JobCancelled, Unschedulable
from metaserve.workers.log_capture import capture_logs, release_logs
from metaserve.workers.registry import run_job
from metaserve.workers.runner import RunOptions
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


SCRATCH_PREFIX = "metaserve-job-"


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


def node_info() -> dict[str, Any]:
    """Where this process runs: Ray node id, host name and pid."""
    import socket

    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid()}


class JobSupervisor:
    """Runs one job's driver (see the module docstring). A threaded actor: :meth:`stop` is
    answered while :meth:`run` works."""

    def __init__(self, job_id: str, spec: dict, storage: StorageConfig, options: RunOptions,
                 memory_bytes: int):
        self.job_id, self.spec, self.options = job_id, spec, options
        self.memory_bytes = memory_bytes
        self.store = open_store(storage)
        self._stop = threading.Event()
        self._out_of_memory: int | None = None  # the resident size that broke the limit
        self._last_heartbeat = time.monotonic()
        self._emitted = 0   # events queued for the dispatcher
        self._recorded = 0  # events the dispatcher has written to the database
        self._events: queue.Queue = queue.Queue()
        self._emit_lock = threading.Lock()

    def _emit(self, kind: str, payload: Any) -> None:
        with self._emit_lock:
            self._emitted += 1
            self._events.put((kind, payload))

    def add_logs(self, records: list[dict[str, Any]]) -> None:
        """Log records of an inner-loop worker (:func:`metaserve.workers.log_capture.forward_logs_to`)."""
        self._emit("logs", records)

    def ready(self) -> dict[str, Any]:
        return node_info()

    def stop(self) -> None:
        """Stop the job at its next check (within a meta-iteration or a worker call)."""
        self._stop.set()

    def heartbeat(self) -> None:
        """The dispatcher is alive and writing this job's events (called every second)."""
        self._last_heartbeat = time.monotonic()

    def recorded(self, count: int) -> None:
        """The dispatcher has written the first ``count`` events to the database."""
        self._recorded = max(self._recorded, count)

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

    def run(self) -> Iterator[tuple[str, Any]]:
        """Run the job to its end, yielding its events (see the module docstring)."""
        self._last_heartbeat = time.monotonic()  # the dispatcher starts calling now
        events, emit = self._events, self._emit
        driver = node_info()
        log_handler = capture_logs(lambda records: emit("logs", records),
                                   f"driver pid {driver['pid']}")
        # Inner-loop workers send their records to this actor (add_logs).
        options = replace(self.options, log_sink=ray.get_runtime_context().current_actor)

        def placement(workers: list[dict]) -> None:
            emit("placement", {"driver": driver, "workers": workers})

        def checkpointed(paths: list[Path]) -> None:
            # Publish a checkpoint only once the dispatcher has written every event before it:
            # a next attempt resumes from it, and must find the metrics up to it recorded. An
            # orphan (dispatcher gone) never gets there; _watch stops it.
            emitted = self._emitted
            while self._recorded < emitted:
                if self._stop.is_set():
                    raise JobCancelled()
                time.sleep(EVENT_POLL_S / 4)
            emit("files", self.store.put(self.job_id, list(paths)))

        hooks = RunHooks(
            report=lambda step, metrics: emit("metrics", (step, metrics)),
            progress=lambda progress: emit("progress", progress),
            checkpointed=checkpointed,
            should_stop=self._stop.is_set,
            workers_ready=placement,
        )
        remove_stale_scratch()
        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{self.job_id}-p{os.getpid()}-"))
        failure: list[BaseException] = []

        def drive() -> None:
            try:
                self.store.fetch_checkpoint(self.job_id, scratch / CHECKPOINT_DIRECTORY)
                run_job(self.spec, scratch, hooks, options)
            except CheckpointError as error:  # name the checkpoint where the user finds it
                failure.append(CheckpointError(str(error).replace(
                    str(scratch / CHECKPOINT_DIRECTORY), self.store.checkpoint_location(self.job_id))))
            except BaseException as error:  # noqa: BLE001 - re-raised by the generator below
                failure.append(error)
            finally:
                if failure and not isinstance(failure[0], JobCancelled):
                    # The whole traceback (an inner-loop worker's too: Ray's error carries it)
                    # goes to the job's log; the job's error stays one line.
                    logger.error("the job's attempt failed", exc_info=failure[0])
                log_handler.flush()  # before this thread ends: run() drains the queue after

        placement([])
        thread = threading.Thread(target=drive, name=f"driver-{self.job_id}", daemon=True)
        thread.start()
        threading.Thread(target=self._watch, args=(thread,), daemon=True,
                         name=f"watch-{self.job_id}").start()
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


def start_supervisor(job_id: str, spec: dict, storage: StorageConfig, options: RunOptions, *,
                     memory_bytes: int, should_stop: Callable[[], bool] = lambda: False):
    """Start ``job_id``'s :class:`JobSupervisor` on the cluster and wait until it runs.

    Raises :class:`Unschedulable` when no node can ever give it ``memory_bytes`` or it is not
    placed within :data:`SUPERVISOR_READY_TIMEOUT_S`, and :class:`JobCancelled` when
    ``should_stop()`` turns true meanwhile.
    """
    largest = max((node.get("Resources", {}).get("memory", 0.0) for node in ray.nodes()
                   if node.get("Alive")), default=0.0)
    if memory_bytes > largest:
        raise Unschedulable(
            f"waiting for resources: the job's driver asks {memory_bytes / 2**30:.2f} GiB of "
            f"memory, the largest node offers {largest / 2**30:.2f} GiB")
    # num_cpus=0: the driver's own arithmetic is the outer step; its inner-loop workers hold
    # the CPUs. max_concurrency=4: stop(), heartbeat(), recorded() and add_logs() are answered
    # while run() works.
    actor = ray.remote(JobSupervisor).options(
        num_cpus=0, memory=memory_bytes, max_restarts=0, max_concurrency=4,
    ).remote(job_id, spec, storage, options, memory_bytes)
    return wait_until_ready(actor, memory_bytes, should_stop, "the job's driver")


def wait_until_ready(actor, memory_bytes: int, should_stop: Callable[[], bool],  # noqa: ANN001, ANN201
                     what: str):
    """``actor`` once its ``ready()`` answered; it is killed and JobCancelled raised when
    ``should_stop()``, Unschedulable past SUPERVISOR_READY_TIMEOUT_S."""
    ready = actor.ready.remote()
    deadline = time.monotonic() + SUPERVISOR_READY_TIMEOUT_S
    try:
        while not ray.wait([ready], timeout=EVENT_POLL_S)[0]:
            if should_stop():
                raise JobCancelled()
            if time.monotonic() > deadline:
                raise Unschedulable(
                    f"waiting for resources: {what} ({memory_bytes / 2**30:.2f} GiB "
                    f"of memory) could not be placed within {SUPERVISOR_READY_TIMEOUT_S:.0f} s")
        ray.get(ready)
    except BaseException:
        ray.kill(actor)
        raise
    return actor
