"""One database probe for every open event stream, not one poll per stream.

Each open SSE stream used to poll its job's events every ``POLL_S`` (0.25 s): 300 streams were
1,200 queries a second, on a job that may not have moved in minutes. :class:`JobWatch` probes
the *marks* of every watched job instead — the job row's ``updated_at`` (status changes and
progress update the row) and the job's last metric row id — in two queries per ``poll_s`` for
all of them, and counts a version per job that rises whenever its marks move. A stream waits
for its job's version to rise, then reads its events; streams at the same place in the same
job (a caught-up audience of one job) share that read too.

The first probe of a job counts as a change, so a stream never misses what happened between
its first read and the probe that started watching its job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from metaserve.service import events

logger = logging.getLogger(__name__)

Poll = Callable[[events.EventCursor], tuple[list[events.JobEvent], bool]]


class JobWatch:
    """The versions of the jobs that have open streams on this process (see the module
    docstring). Touched only from the event loop."""

    def __init__(self, session_factory: Callable[[], Any], poll_s: float) -> None:
        self._session_factory = session_factory
        self.poll_s = poll_s
        self._streams: dict[str, int] = {}  # job id -> open streams
        self._marks: dict[str, tuple[Any, int]] = {}
        self._versions: dict[str, int] = {}
        self._moved: dict[str, asyncio.Event] = {}
        self._reads: dict[tuple[str, int, str], asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self.probes = 0  # how many probes ran (tests and curious operators)

    def watch(self, job_id: str) -> int:
        """Count one more stream of ``job_id``; its version now."""
        self._streams[job_id] = self._streams.get(job_id, 0) + 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._probe_loop())
        return self._versions.get(job_id, 0)

    def unwatch(self, job_id: str) -> None:
        left = self._streams.get(job_id, 0) - 1
        if left > 0:
            self._streams[job_id] = left
            return
        self._streams.pop(job_id, None)
        for table in (self._marks, self._versions, self._moved):
            table.pop(job_id, None)
        for key in [key for key in self._reads if key[0] == job_id]:
            del self._reads[key]

    async def wait_for_change(self, job_id: str, seen: int, timeout_s: float) -> int:
        """``job_id``'s version once it is above ``seen``, or ``seen`` after ``timeout_s``."""
        if self._versions.get(job_id, 0) <= seen:
            moved = self._moved.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(moved.wait(), timeout_s)
            except TimeoutError:
                pass
        return self._versions.get(job_id, 0)

    async def read(self, job_id: str, version: int, cursor: events.EventCursor,
                   poll: Poll) -> tuple[list[events.JobEvent], bool]:
        """``poll(cursor)``, run once for all the streams of ``job_id`` at ``cursor`` that
        saw ``version`` (the events a job has do not depend on who asks: each stream's access
        was checked when it opened)."""
        key = (job_id, version, str(cursor))
        shared = self._reads.get(key)
        if shared is None:
            for old in [k for k in self._reads if k[0] == job_id and k[1] < version]:
                del self._reads[old]
            shared = self._reads[key] = asyncio.ensure_future(run_in_threadpool(poll, cursor))
            if job_id not in self._streams:  # not watched (a read before watch): not kept
                del self._reads[key]
        return await asyncio.shield(shared)

    async def _probe_loop(self) -> None:
        while self._streams:
            job_ids = list(self._streams)
            try:
                marks = await run_in_threadpool(self._probe, job_ids)
            except Exception:  # noqa: BLE001 - a database hiccup: the next probe retries
                logger.exception("probing the watched jobs failed")
                marks = {}
            self.probes += 1
            for job_id, mark in marks.items():
                if job_id in self._streams and self._marks.get(job_id) != mark:
                    self._marks[job_id] = mark
                    self._versions[job_id] = self._versions.get(job_id, 0) + 1
                    moved = self._moved.pop(job_id, None)
                    if moved is not None:
                        moved.set()
            await asyncio.sleep(self.poll_s)

    def _probe(self, job_ids: list[str]) -> dict[str, tuple[Any, int]]:
        with self._session_factory() as session:
            return events.job_marks(session=session, job_ids=job_ids)
