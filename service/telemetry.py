"""Metrics for operators, in Prometheus' format (``GET /metrics``; docs/DASHBOARD.md has a
scrape config).

Three sources:

- the HTTP requests of this server process (:class:`HttpMetrics`, fed by the API's
  middleware): count and latency histogram by method, route template and status;
- this process's dispatcher (module-level counters below): lease renewals, renewal failures,
  leases lost, leases found expired and reclaimed;
- the database, read at scrape time (:class:`DatabaseCollector`): jobs by status, queue
  depth and the age of the oldest queued job, running jobs' tasks/s; and whether a
  dispatcher is connected (this process's, or a standalone one's health report).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from metaserve.service.models import Job, JobStatus

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0)
"""Request latency buckets (seconds): fine below 100 ms, where a status poll lives."""

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
LEASE_EXPIRIES = Counter("metaserve_lease_expiries", "Jobs whose lease had expired (their "
                         "dispatcher or driver died), reclaimed by this dispatcher.",
                         registry=PROCESS_REGISTRY)


class HttpMetrics:
    """Request count and latency of one application (one registry per app, so that several
    apps in a process, as in tests, do not mix their counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("metaserve_http_requests", "HTTP requests answered.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "metaserve_http_request_duration_seconds",
            "Time from a request's arrival to its response head (for an event stream: until "
            "the stream starts).", ["method", "route", "status"], buckets=LATENCY_BUCKETS_S,
            registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape (a few indexed queries)."""

    def __init__(self, sessions: sessionmaker[Session],
                 dispatcher_connected: Callable[[], bool]) -> None:
        self.sessions = sessions
        self.dispatcher_connected = dispatcher_connected

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
        self.http.registry.register(DatabaseCollector(sessions, dispatcher_connected))

    def exposition(self) -> bytes:
        """The text exposition of every metric (HTTP, database, this process's dispatcher)."""
        started = time.perf_counter()
        text = generate_latest(self.http.registry) + generate_latest(PROCESS_REGISTRY)
        scrape = (f"# HELP metaserve_scrape_duration_seconds Time this scrape took.\n"
                  f"# TYPE metaserve_scrape_duration_seconds gauge\n"
                  f"metaserve_scrape_duration_seconds {time.perf_counter() - started:.6f}\n")
        return text + scrape.encode()
