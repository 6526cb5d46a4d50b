"""Metrics for operators, in Prometheus' format (``GET /metrics``; docs/DASHBOARD.md has a
scrape config).

Three sources:

- the HTTP requests of this server process (:class:`HttpMetrics`, fed by the API's
  middleware): count and latency histogram by method, route template and status; and the
  event loop's stalls (:class:`LoopLag`) and the garbage collector's pauses, the time a
  request spends unread in its socket, which no timer in the server can see;
- this process's dispatcher (module-level counters below): lease renewals, renewal failures,
  leases lost, leases found expired and reclaimed;
- the database, read at scrape time (:class:`DatabaseCollector`): jobs by status, queue
  depth and the age of the oldest queued job, running jobs' tasks/s; and whether a
  dispatcher is connected (this process's, or a standalone one's health report).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from metaserve.service.orm import Job, JobStatus

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0, 120.0)
"""Request latency buckets (seconds). Each edge is 2-2.5 times the one below (1-2.5-5 per
decade), so a quantile read from them is known within a factor of 2.5, evenly from a 1 ms
status poll to a 2-minute upload; and the edges are this service's own figures:
25 ms is the status-poll p99 target (benchmarks/load.py), so the share of polls within it is
a bucket ratio, not an interpolation; 100-500 ms is where event-loop stalls (a full garbage
collection, a starved CPU) put a request; 10 s is the request-head timeout, 30 s the adapt
timeout; 60 and 120 s hold dataset uploads and artifact downloads, timed to their last byte.
docs/DASHBOARD.md, "Prometheus", says why finer edges would not make the p99 truer."""

LOOP_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GC_PAUSE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LOOP_LAG_INTERVAL_S = 0.025
"""The loop-lag probe sleeps this long and records how late it woke (40 wake-ups a second,
~0.1% of a core); a stall shorter than this may be seen only in part."""

RECEIVED_AT = "metaserve.received_at"
"""``scope["extensions"][RECEIVED_AT]``: ``time.perf_counter()`` when the server read the
first bytes of the request's head (set by ``metaserve serve``'s HTTP protocol,
:func:`metaserve.api.http_protocol.limited_http_protocol`); the request's time starts there, or
where the application is called when a server does not set it."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# This process's dispatcher (there is at most one per process).
PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
LEASE_RENEWALS = Counter("metaserve_lease_renewals", "Job leases renewed by this process's "
                         "dispatcher.", registry=PROCESS_REGISTRY)
LEASE_RENEWAL_FAILURES = Counter("metaserve_lease_renewal_failures", "Lease renewals that "
                                 "failed (database error; the lease has slack).",
                                 registry=PROCESS_REGISTRY)
LEASES_LOST = Counter("metaserve_leases_lost", "Leases this dispatcher found taken over by "
                      "another (its job stopped here).", registry=PROCESS_REGISTRY)
FENCED_WRITES = Counter("metaserve_fenced_writes", "Events of a job attempt refused because "
                        "the attempt had lost its lease (nothing of them was stored).",
                        registry=PROCESS_REGISTRY)
DATABASE_RETRIES = Counter("metaserve_database_retries", "Writes of a running job retried "
                           "after a database error (the database restarting, a failover).",
                           registry=PROCESS_REGISTRY)
LEASE_EXPIRIES = Counter("metaserve_lease_expiries", "Jobs whose lease had expired (their "
                         "dispatcher or driver died), reclaimed by this dispatcher.",
                         registry=PROCESS_REGISTRY)


class GcPauses(Collector):
    """Garbage collections of this process by generation, and how long each stopped every
    thread (the event loop too): a histogram fed by ``gc.callbacks``. The callback keeps its
    counts in plain lists, not in a prometheus_client metric, whose lock a collection could
    interrupt in the same thread; they are read out at each scrape."""

    def __init__(self) -> None:
        self.bounds = GC_PAUSE_BUCKETS_S
        self.counts = {generation: [0] * (len(self.bounds) + 1) for generation in (0, 1, 2)}
        self.sums = {generation: 0.0 for generation in (0, 1, 2)}
        self._started = 0.0
        self.frozen_objects = 0  # set by record_freeze(): counting walks them all (~100 ms)

    def record_freeze(self) -> int:
        """Count the frozen objects once, right after ``gc.freeze()``: the count walks the
        whole permanent generation holding the GIL (~237 k objects: ~100 ms), which every
        ``/metrics`` scrape paid before."""
        self.frozen_objects = gc.get_freeze_count()
        return self.frozen_objects

    def callback(self, phase: str, info: dict) -> None:
        # Collections never overlap (CPython runs one at a time, callbacks included).
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        generation = info.get("generation")
        if generation not in self.counts:
            return
        index = next((i for i, bound in enumerate(self.bounds) if seconds <= bound),
                     len(self.bounds))
        self.counts[generation][index] += 1
        self.sums[generation] += seconds

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "metaserve_gc_pause_seconds", "Garbage collections of this process by generation "
            "and how long each stopped every thread, the event loop too.", labels=["generation"])
        for generation, counts in self.counts.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), list(counts)):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([str(generation)], buckets, self.sums[generation])
        yield family
        frozen = GaugeMetricFamily("metaserve_gc_frozen_objects", "Objects moved out of the "
                                   "collector's view (``metaserve serve`` freezes its start-up "
                                   "objects once warmed up; 0 before).")
        frozen.add_metric([], self.frozen_objects)
        yield frozen


GC_PAUSES = GcPauses()
PROCESS_REGISTRY.register(GC_PAUSES)
_gc_timer_lock = threading.Lock()


def install_gc_timer() -> None:
    """Time every collection of this process (``gc.callbacks``; once per process)."""
    with _gc_timer_lock:
        if GC_PAUSES.callback not in gc.callbacks:
            gc.callbacks.append(GC_PAUSES.callback)


class HttpMetrics:
    """Request count and latency of one application (one registry per app, so that several
    apps in a process, as in tests, do not mix their counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("metaserve_http_requests", "HTTP requests answered.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "metaserve_http_request_duration_seconds",
            "Time from reading the request's first byte to handing its response's last byte "
            "to the socket (an event stream: to its response head). Not in it: time the "
            "request waited unread while the event loop stalled "
            "(metaserve_event_loop_lag_seconds).", ["method", "route", "status"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)


class LoopLag:
    """How late the event loop runs a callback that is due: a probe sleeps
    :data:`LOOP_LAG_INTERVAL_S` and records how much later it woke. While the loop is stalled
    (a long garbage collection, a callback that does not yield, the process waiting for a
    CPU) a new request waits unread in its socket; the request histogram starts when it is
    read, so this is the part of the clients' latency it cannot show."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram("metaserve_event_loop_lag_seconds", "How late the event loop woke "
                             f"a probe due every {LOOP_LAG_INTERVAL_S * 1000:g} ms (a stall: "
                             "requests arriving meanwhile wait unread).",
                             buckets=LOOP_LAG_BUCKETS_S, registry=registry)

    async def probe(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Runs until cancelled (the API's lifespan)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            self.lag.observe(max(0.0, loop.time() - due))


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape (a few indexed queries)."""

    def __init__(self, sessions: sessionmaker[Session],
                 dispatcher_connected: Callable[[], bool]) -> None:
        self.sessions = sessions
        self.dispatcher_connected = dispatcher_connected

    def describe(self) -> Iterable[Metric]:
        return []  # registering reads no database (the registry would call collect())

    def collect(self) -> Iterable[Metric]:
        by_status = GaugeMetricFamily("metaserve_jobs", "Jobs by status.", labels=["status"])
        depth = GaugeMetricFamily("metaserve_queue_depth", "Jobs waiting to be claimed.")
        oldest = GaugeMetricFamily("metaserve_queue_oldest_age_seconds",
                                   "Age of the oldest queued job (0: none queued).")
        tasks = GaugeMetricFamily("metaserve_running_job_tasks_per_second",
                                  "Tasks adapted per second by each running job (its latest "
                                  "progress report).", labels=["job_id", "name"])
        tasks_total = GaugeMetricFamily("metaserve_running_tasks_per_second",
                                        "Tasks adapted per second by all running jobs.")
        env_steps = GaugeMetricFamily("metaserve_running_job_env_steps_per_second",
                                      "Environment steps per second of each running meta-RL "
                                      "job (its latest progress report).",
                                      labels=["job_id", "name"])
        up = GaugeMetricFamily("metaserve_database_up", "The database answered this scrape.")
        try:
            with self.sessions() as session:
                counts = dict(session.execute(
                    select(Job.status, func.count()).group_by(Job.status)).all())
                first_queued = session.scalar(select(func.min(Job.created_at))
                                              .where(Job.status == JobStatus.QUEUED.value))
                running = session.execute(select(Job.id, Job.name, Job.progress).where(
                    Job.status == JobStatus.RUNNING.value)).all()
        except Exception:  # noqa: BLE001 - a scrape reports the database down, never a 500
            logger.exception("metrics: the database did not answer")
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            for status in JobStatus:
                by_status.add_metric([status.value], counts.get(status.value, 0))
            yield by_status
            depth.add_metric([], counts.get(JobStatus.QUEUED.value, 0))
            yield depth
            age = 0.0
            if first_queued is not None:
                if first_queued.tzinfo is None:
                    first_queued = first_queued.replace(tzinfo=timezone.utc)
                age = max(0.0, (datetime.now(timezone.utc) - first_queued).total_seconds())
            oldest.add_metric([], age)
            yield oldest
            total = 0.0
            for job_id, name, progress in running:
                rate = (progress or {}).get("tasks_per_s")
                if isinstance(rate, (int, float)):
                    tasks.add_metric([job_id, name], float(rate))
                    total += float(rate)
                steps = (progress or {}).get("env_steps_per_s")
                if isinstance(steps, (int, float)):
                    env_steps.add_metric([job_id, name], float(steps))
            yield tasks
            yield env_steps
            tasks_total.add_metric([], total)
            yield tasks_total
        connected = GaugeMetricFamily("metaserve_dispatcher_connected",
                                      "A dispatcher is connected to Ray and the database "
                                      "(this server's, or a standalone one's recent health "
                                      "report).")
        connected.add_metric([], 1.0 if self.dispatcher_connected() else 0.0)
        yield connected


class Telemetry:
    """An application's metrics: its HTTP metrics and its database collector."""

    def __init__(self, sessions: sessionmaker[Session],
                 dispatcher_connected: Callable[[], bool]) -> None:
        self.http = HttpMetrics()
        self.loop_lag = LoopLag(self.http.registry)
        self.http.registry.register(DatabaseCollector(sessions, dispatcher_connected))
        install_gc_timer()

    def exposition(self) -> bytes:
        """The text exposition of every metric (HTTP, database, this process's dispatcher)."""
        started = time.perf_counter()
        text = generate_latest(self.http.registry) + generate_latest(PROCESS_REGISTRY)
        scrape = (f"# HELP metaserve_scrape_duration_seconds Time this scrape took.\n"
                  f"# TYPE metaserve_scrape_duration_seconds gauge\n"
                  f"metaserve_scrape_duration_seconds {time.perf_counter() - started:.6f}\n")
        return text + scrape.encode()
