"""Concurrency: idempotent submits racing on a live server (SQLite and PostgreSQL), SQLite
under twenty concurrent writers, and two dispatchers sharing one PostgreSQL queue."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from metaserve.service import job_store, jobs
from metaserve.service.dispatcher import Dispatcher
from metaserve.service.orm import Artifact, Job, Metric
from metaserve.service.settings import Settings
from tests.helpers import TWO_LINE_SPEC, bearer
from tests.server_process import ServerProcess
from metaserve.workers.spec import JobSpec

pytestmark = pytest.mark.dialects  # idempotent submits racing: the SQL differs

CLIENTS = 50
DISTINCT_SUBMITS = 500
EXACTLY_ONCE_JOBS = int(os.environ.get("METASERVE_EXACTLY_ONCE_JOBS", "12"))
"""Jobs of the two-dispatcher test: each starts a Ray actor (a process importing torch,
~8 s of CPU per 4 jobs on 2 cores), so the suite runs 12; docs/RELIABILITY.md has the
100-job run (``METASERVE_EXACTLY_ONCE_JOBS=100``)."""


def submit_idempotently(server: ServerProcess, keys: list[str]) -> list[tuple[str, int, str]]:
    """POST each key's job from :data:`CLIENTS` threads, one HTTP connection each; returns
    (key, status, job id or error text) per request."""
    local = threading.local()

    def post(key: str) -> tuple[str, int, str]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.url, timeout=60,
                                        headers=bearer(server.admin_key))
        spec = {**TWO_LINE_SPEC, "seed": int(key.rsplit("-", 1)[1])}
        response = local.client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        body = response.json()
        return key, response.status_code, body.get("id") or str(body)

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(post, keys))


@pytest.mark.slow
@pytest.mark.server
def test_a_thousand_idempotent_submits_from_fifty_clients_make_exactly_500_jobs(
        db_url: str, tmp_path: Path) -> None:
    keys = [f"job-{index}" for index in range(DISTINCT_SUBMITS)] * 2
    random.Random(0).shuffle(keys)
    server = ServerProcess(tmp_path, METASERVE_DISPATCHER="false",
                           METASERVE_DATABASE_URL=db_url).start()
    try:
        results = submit_idempotently(server, keys)
        with server.client() as client:
            listed, cursor = [], None
            while True:
                page = client.get("/v1/jobs", params={"limit": 100,
                                                      **({"cursor": cursor} if cursor else {})})
                listed += [job["id"] for job in page.json()["data"]]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    break
    finally:
        server.terminate()
    assert Counter(status for _, status, _ in results) == {201: 500, 200: 500}
    ids_by_key: dict[str, set[str]] = {}
    for key, _, job_id in results:
        ids_by_key.setdefault(key, set()).add(job_id)
    assert all(len(ids) == 1 for ids in ids_by_key.values())
    assert sorted(listed) == sorted(ids.pop() for ids in ids_by_key.values())
    assert len(set(listed)) == DISTINCT_SUBMITS


@pytest.mark.slow
@pytest.mark.server
def test_twenty_concurrent_writers_never_see_database_is_locked_on_sqlite(tmp_path: Path):
    """Twenty clients each submit and cancel jobs as fast as they can (every request a write
    transaction on one SQLite file), while this process also writes metrics to that file
    the way a dispatcher's writer does."""
    writers, rounds = 20, 15
    db_path = tmp_path / "metaserve.db"
    server = ServerProcess(tmp_path, METASERVE_DISPATCHER="false",
                           METASERVE_DATABASE_URL=f"sqlite:///{db_path}").start()
    stop = threading.Event()

    def write_metrics() -> int:
        from metaserve.service.db import make_engine, session_factory

        engine = make_engine(f"sqlite:///{db_path}")
        sessions = session_factory(engine)
        with server.client() as client:
            job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC).json()["id"]
        step = 0
        while not stop.is_set():
            step += 1
            with sessions.begin() as session:
                job_store.add_metrics(session=session, job_id=job_id,
                                      rows=[(step, f"m{i}", float(i)) for i in range(50)])
        engine.dispose()
        return step

    def write(index: int) -> list[tuple[int, str]]:
        answers = []
        with httpx.Client(base_url=server.url, timeout=60,
                          headers=bearer(server.admin_key)) as client:
            for round_ in range(rounds):
                created = client.post("/v1/jobs", json={**TWO_LINE_SPEC, "seed": round_},
                                      headers={"Idempotency-Key": f"w{index}-{round_}"})
                answers.append((created.status_code, created.text))
                if created.status_code == 201:
                    cancelled = client.post(f"/v1/jobs/{created.json()['id']}/cancel")
                    answers.append((cancelled.status_code, cancelled.text))
        return answers

    try:
        with ThreadPoolExecutor(writers + 1) as pool:
            metrics_writer = pool.submit(write_metrics)
            answers = [answer for result in pool.map(write, range(writers)) for answer in result]
            stop.set()
            metric_steps = metrics_writer.result()
    finally:
        stop.set()
        server.terminate()
    assert Counter(status for status, _ in answers) == {201: writers * rounds,
                                                        200: writers * rounds}
    assert [text for _, text in answers if "locked" in text] == []
    assert "database is locked" not in server.log_path.read_text()
    assert metric_steps > 0


# --------------------------------------------------------------------------- two dispatchers

TINY = {**TWO_LINE_SPEC, "iterations": 2, "meta_batch_size": 2, "log_every": 1,
        "checkpoint_every": 2, "evaluation": {"every": 2, "tasks": 2, "inner_steps": [1]},
        "resources": {"workers": 1, "cpus_per_worker": 0.5}}


class ClaimLog(logging.Handler):
    """Records which dispatcher thread logged each "claimed job"."""

    def __init__(self) -> None:
        super().__init__()
        self.claims: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "claimed job":
            self.claims.append((record.thread, record.job_id))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
def test_two_dispatchers_on_postgres_run_each_job_exactly_once(
        ray_session, sessions, db_url, alice, tmp_path):  # noqa: ANN001
    count = EXACTLY_ONCE_JOBS
    spec = JobSpec.model_validate(TINY)
    with sessions() as session:
        job_ids = [jobs.submit_job(session=session, owner=alice, spec=spec.model_copy(
            update={"seed": index}))[0].id for index in range(count)]
    settings = Settings(database_url=db_url, artifact_root=tmp_path / "artifacts",
                        dispatcher_concurrency=2)
    dispatchers = [Dispatcher(settings, sessions, worker_id=f"dispatcher-{index}")
                   for index in range(2)]
    claim_log = ClaimLog()
    logger = logging.getLogger("metaserve.service.dispatcher")
    logger.addHandler(claim_log)
    logger.setLevel(logging.INFO)
    for dispatcher in dispatchers:
        dispatcher.start()
    try:
        deadline = time.monotonic() + 30 + 25 * count  # a loaded 2-core machine: ~10 s a job
        while time.monotonic() < deadline:
            with sessions() as session:
                open_jobs = session.scalar(select(func.count()).select_from(Job).where(
                    Job.status.not_in(["succeeded", "failed", "cancelled"])))
            if open_jobs == 0:
                break
            time.sleep(1)
    finally:
        for dispatcher in dispatchers:
            dispatcher.stop()
        logger.removeHandler(claim_log)
    with sessions() as session:
        rows = session.execute(select(Job.id, Job.status, Job.attempt)).all()
        metric_jobs = set(session.scalars(select(Metric.job_id).distinct()))
        meta_inits = set(session.scalars(select(Artifact.job_id).where(
            Artifact.name == "meta_init.safetensors")))
    assert sorted((job_id, status, attempt) for job_id, status, attempt in rows) == sorted(
        (job_id, "succeeded", 1) for job_id in job_ids)
    assert metric_jobs == meta_inits == set(job_ids)
    assert sorted(job_id for _, job_id in claim_log.claims) == sorted(job_ids)
    threads = {dispatcher._thread.ident for dispatcher in dispatchers}
    assert {thread for thread, _ in claim_log.claims} == threads  # both took a share
