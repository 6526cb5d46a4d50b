"""Capture a job's log records where they happen (its driver and its inner-loop workers, each
a Ray process of its own; Ray runs without ``log_to_driver``) and hand them to a sink: the
driver's :class:`~metaserve.workers.supervisor.JobSupervisor`, which streams them to the
dispatcher with the job's other events, which stores them (service/job_logs.py).

A record is plain data: ``{"time": epoch seconds, "level", "source", "message"}``; the message
holds the formatted traceback when the record has one. Bounded on the way: at most
:data:`MAX_PENDING` records wait for the sink; beyond that the oldest are dropped and a marker
record says how many.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

FLUSH_S = 0.5
FLUSH_COUNT = 200
SEND_TIMEOUT_S = 5.0
MAX_PENDING = 2_000
MAX_MESSAGE_CHARS = 16_000
_FORMATTER = logging.Formatter()


def record_data(record: logging.LogRecord, source: str) -> dict[str, Any]:
    """A log record as plain data (its message formatted, with its traceback if any)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad %-format in someone's log call
        message = str(record.msg)
    if record.exc_info:
        message = f"{message}\n{_FORMATTER.formatException(record.exc_info)}"
    elif record.exc_text:
        message = f"{message}\n{record.exc_text}"
    if record.stack_info:
        message = f"{message}\n{record.stack_info}"
    return {"time": record.created, "level": record.levelname,
            "source": f"{source} {record.name}", "message": message[:MAX_MESSAGE_CHARS]}


class JobLogHandler(logging.Handler):
    """Collects records of this process and passes them to ``sink`` in batches, from a thread
    of its own every :data:`FLUSH_S` (never from the logging call: a sink may be a remote call)."""

    def __init__(self, sink: Callable[[list[dict[str, Any]]], Any], source: str,
                 level: int = logging.INFO) -> None:
        super().__init__(level)
        self.sink, self.source = sink, source
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._dropped = 0
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._sending = threading.local()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._sending, "active", False):
            return
        data = record_data(record, self.source)
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self._dropped += 1
            self._pending.append(data)
            urgent = record.levelno >= logging.WARNING or len(self._pending) >= FLUSH_COUNT
        if urgent:  # a warning or an error may be a process's last words: send it now
            self.flush()

    def flush(self) -> None:
        with self._flushing:  # batches leave in order
            with self._lock:
                batch, dropped = list(self._pending), self._dropped
                self._pending.clear()
                self._dropped = 0
            if dropped:
                batch.insert(0, {"time": time.time(), "level": "WARNING", "source": self.source,
                                 "message": f"[{dropped:,} log records dropped: logged faster "
                                            "than they could be sent]"})
            if batch:
                self._sending.active = True  # what the sink itself logs is not captured
                try:
                    self.sink(batch)
                except Exception:  # noqa: BLE001 - the log must never break the job
                    pass
                finally:
                    self._sending.active = False

    def _run(self) -> None:
        while not self._closed.wait(FLUSH_S):
            self.flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()


def capture_logs(sink: Callable[[list[dict[str, Any]]], Any], source: str) -> JobLogHandler:
    """Install a :class:`JobLogHandler` on the root logger of this process (``metaserve``'s
    own records from INFO up; other libraries' at the root's level). Remove it with
    :func:`release_logs`."""
    handler = JobLogHandler(sink, source)
    logging.getLogger().addHandler(handler)
    package = logging.getLogger("metaserve")
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return handler


def release_logs(handler: JobLogHandler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def forward_logs_to(supervisor: Any, source: str) -> JobLogHandler | None:
    """In an inner-loop worker: send this process's records to the job's supervisor actor
    (``supervisor``: its Ray actor handle, or None when the job runs without one, e.g.
    ``metaserve train``). Installed once per process."""
    if supervisor is None:
        return None
    for handler in logging.getLogger().handlers:
        if isinstance(handler, JobLogHandler):
            return handler
    import ray

    def send(batch: list[dict[str, Any]]) -> None:
        # Waited for: a warning or an error is often a worker's last words before its call
        # fails, and the driver must have them before it reports the failure and ends.
        ray.get(supervisor.add_logs.remote(batch), timeout=SEND_TIMEOUT_S)

    return capture_logs(send, source)
