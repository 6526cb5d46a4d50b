"""The run writer's retries (service/run_events.py), SQLite and PostgreSQL: a statement the
database answers and refuses (PostgreSQL's statement_timeout, SQLite locked past its busy
timeout) is retried for at most a lease, then the batch fails (the dispatcher retries the
attempt) instead of being retried forever while the lease keeper renews the lease; a
database that is away is still retried past the lease until it is back."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from metaserve.service import claims, db, job_store
from metaserve.service.db import make_engine, session_factory
from metaserve.service.orm import Metric
from metaserve.service.run_events import RunEventWriter, refused
from tests.helpers import LEASE_S, submit_to_store

pytestmark = pytest.mark.dialects  # each dialect's own timeout

WRITER_LEASE_S = 1.0
STATEMENT_TIMEOUT_S = 0.3


def test_a_statement_the_database_keeps_refusing_is_retried_for_a_lease_then_fails(
        engine, sessions, session, alice, db_url, monkeypatch):  # noqa: ANN001
    job = submit_to_store(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="d", lease_s=LEASE_S)
    if engine.dialect.name == "sqlite":
        monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", int(STATEMENT_TIMEOUT_S * 1000))
        timed = make_engine(db_url)
        holder = sqlite3.connect(make_url(db_url).database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held: every write is refused
        release = holder.rollback
    else:
        timed = make_engine(db_url, statement_timeout_s=STATEMENT_TIMEOUT_S)
        connection = engine.connect()
        transaction = connection.begin()
        connection.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"),
                           {"id": job.id})  # the job's row lock: the fence waits for it
        release = transaction.rollback
    try:
        writer = RunEventWriter(session_factory(timed), "d", job.id, 1, set(),
                                lease_s=WRITER_LEASE_S)
        started = time.monotonic()
        writer.put(job.id, "metrics", (1, {"train/loss": 0.5}))
        with pytest.raises(OperationalError) as raised:
            writer.close(timeout=20)  # unbounded retries would run until this abandons them
        elapsed = time.monotonic() - started
    finally:
        release()
        if engine.dialect.name != "sqlite":
            connection.close()
        timed.dispose()
    assert refused(raised.value), raised.value
    assert WRITER_LEASE_S <= elapsed < 10, elapsed
    assert writer.retries >= 2 and writer.failure is raised.value
    with session.begin():
        assert session.execute(select(Metric).where(Metric.job_id == job.id)).all() == []


def test_a_database_away_longer_than_the_lease_is_still_retried_until_it_is_back(
        sessions, session, alice, monkeypatch):  # noqa: ANN001
    job = submit_to_store(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="d", lease_s=LEASE_S)
    real_fence, back_at = job_store.fence, time.monotonic() + 3 * WRITER_LEASE_S

    def away_for_three_leases(**kwargs):  # noqa: ANN003, ANN202
        if time.monotonic() < back_at:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        return real_fence(**kwargs)

    monkeypatch.setattr(job_store, "fence", away_for_three_leases)
    writer = RunEventWriter(sessions, "d", job.id, 1, set(), lease_s=WRITER_LEASE_S)
    writer.put(job.id, "metrics", (1, {"train/loss": 0.5}))
    writer.close(timeout=30)
    assert writer.failure is None and writer.retries >= 4
    with session.begin():
        assert session.execute(select(Metric.step, Metric.value).where(
            Metric.job_id == job.id)).all() == [(1, 0.5)]


def test_refused_names_timeouts_and_locks_not_a_database_away():
    import psycopg.errors

    def wrapped(orig: BaseException) -> OperationalError:
        return OperationalError("SELECT 1", {}, orig)

    assert refused(wrapped(psycopg.errors.QueryCanceled("canceling statement due to "
                                                        "statement timeout")))
    assert refused(wrapped(psycopg.errors.LockNotAvailable("lock timeout")))
    assert refused(wrapped(psycopg.errors.DeadlockDetected("deadlock detected")))
    assert refused(wrapped(sqlite3.OperationalError("database is locked")))
    assert not refused(wrapped(psycopg.OperationalError("connection failed: Connection refused")))
    assert not refused(wrapped(psycopg.errors.AdminShutdown("terminating connection due to "
                                                            "administrator command")))
    assert not refused(wrapped(ConnectionRefusedError("connection refused")))
