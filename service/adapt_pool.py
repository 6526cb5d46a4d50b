"""Where ``POST /v1/jobs/{id}/adapt`` computes: processes of their own, not the API process.

Adapting runs torch (tensors from the request's lists, the inner steps, predictions back to
lists). In threads of the API process it held the GIL for stretches the event loop then
waited behind (``/healthz`` p99 64 ms with 45 parallel adapt calls, docs/RELIABILITY.md). Here
each of ``concurrency`` slots is an adapt process (spawned on first use, kept, niced below the
API, every thread of it: :mod:`metaserve.service.background`; one torch thread), fed over a
pipe by a thread of the pool that only waits on it:

* at most ``concurrency`` compute at once and ``queue`` more wait; one more is refused at once
  (:class:`AdaptBusy`, 503 + ``Retry-After``);
* a computation gets ``timeout_s`` from the moment its process takes it (starting a process
  is not counted); a late one is killed with its process (:class:`AdaptTimedOut`, 504), so the
  slot is free at once and the bound on work always holds;
* a process that dies (e.g. killed for memory) answers :class:`AdaptProcessDied` (503) and is
  replaced on the next call; the domain's own errors (422, 409, ...) come back as raised.

A process ends when the pool shuts down, and by itself when the API process is gone (its pipe
closes), so none outlives the server.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from metaserve.service.adaptation import AdaptWork, MetaInitCache, compute_adaptation
from metaserve.service.background import run_in_background
from metaserve.service.exceptions import (AdaptBusy, AdaptFailed, AdaptProcessDied, AdaptTimedOut,
                                          MetaserveError)

logger = logging.getLogger(__name__)

ADAPT_RETRY_AFTER_S = 2
ADAPT_NICENESS = 10
"""Added to an adapt process's nice value: the API process's requests win the CPU, and an
adaptation wins it from a training job's Ray workers (15)."""
PROCESS_START_TIMEOUT_S = 120.0
"""How long a new process may take to import torch and the engine and say it is ready."""
PROCESS_EXIT_WAIT_S = 5.0


def serve_adaptations(connection: Connection) -> None:
    """An adapt process's loop: one :class:`AdaptWork` in, ``(True, result)`` or ``(False,
    error)`` out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; it stops us
    run_in_background(ADAPT_NICENESS)  # before torch starts threads: they inherit it
    import torch

    import metaserve.workers.engine.final_artifact  # noqa: F401 - what loading needs, before "ready"

    torch.set_num_threads(1)
    cache = MetaInitCache()
    try:
        connection.send("ready")
    except OSError:  # the API process is gone already
        return
    while True:
        try:
            work = connection.recv()
        except (EOFError, OSError):
            return
        try:
            answer: tuple[bool, Any] = (True, compute_adaptation(work, cache))
        except MetaserveError as error:
            answer = (False, error)
        except Exception as error:  # noqa: BLE001 - anything else is the service's fault: 500
            logger.exception("adaptation failed", extra={"job_id": work.job_id})
            answer = (False, AdaptFailed(f"the adaptation failed: {type(error).__name__}",
                                         job_id=work.job_id))
        try:
            connection.send(answer)
        except OSError:
            return


class AdaptProcess:
    """One adapt process and the parent's end of its pipe."""

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self._connection, child = context.Pipe()
        self.process = context.Process(target=serve_adaptations, args=(child,),
                                       name="metaserve-adapt", daemon=True)
        self.process.start()
        child.close()
        self.ready = False

    def call(self, work: AdaptWork, timeout_s: float) -> dict[str, Any]:
        """``work``'s result; TimeoutError when it takes longer than ``timeout_s`` (measured
        once the process is ready), EOFError/OSError when the process died."""
        if not self.ready:
            if not self._connection.poll(PROCESS_START_TIMEOUT_S):
                raise EOFError("the adapt process did not start")
            self._connection.recv()  # "ready"
            self.ready = True
        self._connection.send(work)
        if not self._connection.poll(timeout_s):
            raise TimeoutError
        ok, value = self._connection.recv()
        if ok:
            return value
        raise value

    def stop(self) -> None:
        self.process.kill()
        self.process.join(PROCESS_EXIT_WAIT_S)
        self._connection.close()


class AdaptPool:
    """``concurrency`` adapt processes, ``queue`` calls waiting; see the module docstring."""

    def __init__(self, *, concurrency: int, queue: int, timeout_s: float) -> None:
        self.concurrency, self.queue, self.timeout_s = concurrency, queue, timeout_s
        self._context = multiprocessing.get_context("spawn")  # never fork a process running Ray
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="metaserve-adapt")
        self._idle: list[AdaptProcess] = []
        self._processes: set[AdaptProcess] = set()
        self._taken = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def taken(self) -> int:
        """Calls computing or waiting now."""
        return self._taken

    def process_ids(self) -> list[int]:
        """The adapt processes alive now."""
        with self._lock:
            return [p.process.pid for p in self._processes if p.process.is_alive()]

    async def run(self, prepare: Callable[[], AdaptWork]) -> dict[str, Any]:
        """``prepare()`` (the API process's half, run in a pool thread) then its work in an
        adapt process; the result, or the error either half raised."""
        with self._lock:
            if self._taken >= self.concurrency + self.queue:
                error = AdaptBusy(f"{self.concurrency} adaptations are running and "
                                  f"{self.queue} waiting; retry later")
                error.headers = {"Retry-After": str(ADAPT_RETRY_AFTER_S)}
                raise error
            self._taken += 1
        future = self._threads.submit(self._call, prepare)
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._taken -= 1

    def _call(self, prepare: Callable[[], AdaptWork]) -> dict[str, Any]:
        work = prepare()
        process = self._take()
        started = time.monotonic()
        try:
            result = process.call(work, self.timeout_s)
        except TimeoutError:
            self._discard(process)
            logger.warning("adaptation timed out; its process killed",
                           extra={"job_id": work.job_id, "timeout_s": self.timeout_s})
            raise AdaptTimedOut(f"the adaptation did not finish within {self.timeout_s:g} s; "
                                "try fewer steps or smaller arrays") from None
        except (EOFError, OSError):
            self._discard(process)
            logger.error("adapt process died", extra={
                "job_id": work.job_id, "exitcode": process.process.exitcode,
                "after_s": round(time.monotonic() - started, 3)})
            error = AdaptProcessDied(job_id=work.job_id)
            error.headers = {"Retry-After": str(ADAPT_RETRY_AFTER_S)}
            raise error from None
        except BaseException:
            self._give_back(process)  # the domain's error: the process is fine
            raise
        self._give_back(process)
        return result

    def _take(self) -> AdaptProcess:
        with self._lock:
            if self._closed:
                raise AdaptProcessDied("the server is shutting down")
            if self._idle:
                return self._idle.pop()
            process = AdaptProcess(self._context)
            self._processes.add(process)
            return process

    def _give_back(self, process: AdaptProcess) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(process)
                return
        process.stop()

    def _discard(self, process: AdaptProcess) -> None:
        with self._lock:
            self._processes.discard(process)
        process.stop()

    def shutdown(self) -> None:
        """Stop every adapt process (a computation running is killed) and the threads."""
        with self._lock:
            self._closed = True
            processes, self._processes, self._idle = list(self._processes), set(), []
        for process in processes:
            process.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)
