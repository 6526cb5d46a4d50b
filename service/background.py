"""The CPU priority of the processes the API process hands work to (adapt, dataset conversion).

Their work may wait a little; the API's requests, ``/healthz`` first, may not. Each such
process is niced (adapt 10, conversion 5): below the API process (0), above a training job's
Ray workers (15) where they share a host, so an adaptation is not starved by training.

``METASERVE_CHILD_SCHEDULER=idle`` (read by the child from its environment, which it inherits
from the server) puts them at Linux's ``SCHED_IDLE`` instead: a CPU only when no ordinary
thread wants it, any thread that becomes runnable preempts them at once. For an API host
that runs no training (``metaserve serve --no-dispatcher`` beside a cluster); not the
default, since it also puts them below every training worker of the host. Measured against
the default under the hostile load: docs/notes/hostile-load-tail.md.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

SCHEDULER_ENV = "METASERVE_CHILD_SCHEDULER"


def run_in_background(niceness: int) -> str:
    """Add ``niceness`` to every thread of the calling process (on Linux ``nice`` is per
    thread, and an import may have started one already; the threads started afterwards
    inherit it) and, when ``METASERVE_CHILD_SCHEDULER=idle``, move them to ``SCHED_IDLE``.
    Returns the policy it ended with: ``"nice"`` or ``"idle"``. Call it before the work."""
    target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness)
    idle = os.environ.get(SCHEDULER_ENV, "nice") == "idle" and hasattr(os, "SCHED_IDLE")
    policy = "idle" if idle else "nice"
    for thread in _threads():
        try:
            os.setpriority(os.PRIO_PROCESS, thread, target)
            if idle:
                os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # it ended meanwhile; or the platform refuses SCHED_IDLE
            if thread == 0:
                policy = "nice"
    return policy


def _threads() -> list[int]:
    """This process's threads: 0 (the caller), then the others (Linux: from /proc)."""
    me = threading.get_native_id()
    try:
        return [0, *(int(task.name) for task in Path("/proc/self/task").iterdir()
                     if int(task.name) != me)]
    except OSError:
        return [0]
