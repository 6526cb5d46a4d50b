"""Fencing: two attempts of one job write concurrently (two RunEventWriters on their own
threads and connections, SQLite and PostgreSQL); the database ends with exactly one
attempt's metrics, artifact rows, logs and progress, and the stale writer's refusals are
counted. And infrastructure faults: a batch the database refuses is retried, not failed."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError

from metaserve.service import claims, job_store
from metaserve.service.db import engine_timeouts, make_engine, session_factory
from metaserve.service.exceptions import LeaseLost
from metaserve.service.orm import Artifact, JobLogLine, Metric
from metaserve.service.run_events import RunEventWriter, transient
from metaserve.service.settings import Settings
from metaserve.workers.object_store import ArtifactFile
from tests.helpers import LEASE_S, reread, submit_to_store, wait_until

pytestmark = pytest.mark.dialects  # row locks (PostgreSQL) and the write lock (SQLite)

STEPS = 120


def stream(writer: RunEventWriter, job_id: str, value: float, source: str,
           stop: threading.Event, pace_s: float = 0.0) -> None:
    """What a run's supervisor sends: per step a metric and a log line, progress now and
    then (the fence, not progress's own guard, must refuse the batches without it), and the
    artifact at the end (its sha256 names the writer)."""
    for step in range(STEPS):
        if stop.is_set():
            break
        writer.put(job_id, "metrics", (step, {"train/loss": value}))
        writer.put(job_id, "logs", [{"time": time.time(), "level": "INFO", "source": source,
                                     "message": f"{source} {step}"}])
        if step % 40 == 39:
            writer.put(job_id, "progress", {"iteration": step, "writer": source})
        if pace_s:
            time.sleep(pace_s)
    writer.put(job_id, "files", [ArtifactFile(name="meta_init.safetensors", size=8,
                                              sha256=source * 64, media_type="application/x")])


def test_two_attempts_writing_at_once_leave_exactly_one_attempts_rows(sessions, session, alice):
    job = submit_to_store(session, alice)
    with session.begin():
        first = claims.claim_next_job(session=session, worker_id="dispatcher-a", lease_s=LEASE_S)
    stale = RunEventWriter(sessions, "dispatcher-a", job.id, first.attempt, set(),
                           lease_s=LEASE_S)
    stop_stale = threading.Event()
    stale_thread = threading.Thread(target=stream, args=(stale, job.id, 1.0, "a", stop_stale,
                                                         0.005))
    stale_thread.start()
    try:
        wait_until(lambda: stale.written >= 20 or None, 60, "the first attempt writing")
        # dispatcher-a is paused past its lease: dispatcher-b takes the job over (an
        # interruption, so the same attempt number: the lease owner fences) ...
        with session.begin():
            job_store.expire_leases(session=session, worker_id="dispatcher-a")
        def reclaim():  # noqa: ANN202 - PostgreSQL skips the row while a fenced batch holds it
            with session.begin():
                return claims.claim_next_job(session=session, worker_id="dispatcher-b",
                                             lease_s=LEASE_S)

        second = wait_until(reclaim, 30, "dispatcher-b reclaiming the job", interval_s=0.01)
        assert (second.id, second.attempt, second.interruptions) == (job.id, 1, 1)
        # ... and resumes from a checkpoint at step 0, writing while dispatcher-a still does.
        current = RunEventWriter(sessions, "dispatcher-b", job.id, second.attempt, set(),
                                 lease_s=LEASE_S)
        stream(current, job.id, 2.0, "b", threading.Event())
        current.close()
    finally:
        stale_thread.join()
        stale.close()
    assert current.refused == 0 and not current.lease_lost.is_set()
    assert stale.lease_lost.is_set() and stale.refused > 0
    with session.begin():
        values = session.execute(select(Metric.step, Metric.value).where(
            Metric.job_id == job.id).order_by(Metric.step)).all()
        logs = session.execute(select(JobLogLine.seq, JobLogLine.source, JobLogLine.message)
                               .where(JobLogLine.job_id == job.id)
                               .order_by(JobLogLine.seq)).all()
        artifacts = session.execute(select(Artifact.name, Artifact.sha256).where(
            Artifact.job_id == job.id)).all()
    assert values == [(step, 2.0) for step in range(STEPS)]
    assert artifacts == [("meta_init.safetensors", "b" * 64)]
    assert reread(sessions, job.id).progress == {"iteration": STEPS - 1, "writer": "b"}
    # The stale attempt's log is the lines it wrote while it held the lease, all before the
    # current attempt's first line: none of its later lines was stored.
    sources = [source for _, source, _ in logs]
    assert sources == ["a"] * sources.count("a") + ["b"] * STEPS
    assert [message for _, source, message in logs if source == "a"] == [
        f"a {step}" for step in range(sources.count("a"))]


def test_a_stale_attempt_of_the_same_dispatcher_is_fenced_by_its_attempt(sessions, session,
                                                                          alice):
    job = submit_to_store(session, alice, max_attempts=3)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="d", lease_s=LEASE_S)
    with session.begin():
        job_store.fail_attempt(session=session, job_id=job.id, worker_id="d", error="boom",
                               attempt=1)
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="d", lease_s=LEASE_S).attempt == 2
    stale = RunEventWriter(sessions, "d", job.id, 1, set(), lease_s=LEASE_S)
    current = RunEventWriter(sessions, "d", job.id, 2, set(), lease_s=LEASE_S)
    threads = [threading.Thread(target=stream, args=(writer, job.id, value, source,
                                                     threading.Event()))
               for writer, value, source in ((stale, 1.0, "a"), (current, 2.0, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stale.close()
    current.close()
    assert stale.refused == STEPS * 2 + STEPS // 40 + 1 and current.refused == 0
    with session.begin():
        assert {value for (value,) in session.execute(
            select(Metric.value).where(Metric.job_id == job.id))} == {2.0}
        assert {source for (source,) in session.execute(
            select(JobLogLine.source).where(JobLogLine.job_id == job.id))} == {"b"}


def test_a_batch_the_database_refuses_is_retried_not_failed(sessions, session, alice,
                                                           monkeypatch):
    """The database away for three batches: the writer waits and writes them (no failure)."""
    from sqlalchemy.exc import DBAPIError

    job = submit_to_store(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="d", lease_s=LEASE_S)
    real_fence, refusals = job_store.fence, [3]

    def unreachable_three_times(**kwargs):  # noqa: ANN003, ANN202
        if refusals[0]:
            refusals[0] -= 1
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        return real_fence(**kwargs)

    monkeypatch.setattr(job_store, "fence", unreachable_three_times)
    writer = RunEventWriter(sessions, "d", job.id, 1, set(), lease_s=2.0)
    writer.put(job.id, "metrics", (1, {"train/loss": 0.5}))
    writer.close()
    assert (writer.retries, writer.failure, writer.refused) == (3, None, 0)
    with session.begin():
        assert session.execute(select(Metric.step, Metric.value).where(
            Metric.job_id == job.id)).all() == [(1, 0.5)]


def test_a_fenced_write_keeps_nothing_of_its_transaction(sessions, session, alice):
    job = submit_to_store(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="d", lease_s=LEASE_S)
    with pytest.raises(LeaseLost), session.begin():
        job_store.add_metrics(session=session, job_id=job.id, rows=[(1, "x", 1.0)])
        job_store.fence(session=session, job_id=job.id, worker_id="other", attempt=1)
    with session.begin():
        assert session.execute(select(Metric).where(Metric.job_id == job.id)).all() == []


def test_one_statement_renews_every_lease_a_dispatcher_holds_and_names_the_lost(
        sessions, session, alice):
    ids = [submit_to_store(session, alice).id for _ in range(3)]
    with session.begin():
        for _ in ids:
            claims.claim_next_job(session=session, worker_id="d", lease_s=LEASE_S)
    with session.begin():  # the first one's lease lapsed and another dispatcher took it
        session.execute(job_store.guarded_update(ids[0]).values(lease_owner="other"))
        job_store.request_cancel(session=session, job_id=ids[1], owner=alice)
    attempts = {job_id: 1 for job_id in ids}
    with session.begin():
        assert job_store.held_statuses(session=session, worker_id="d", attempts=attempts) == {
            ids[1]: "cancelling", ids[2]: "running"}
    before = reread(sessions, ids[2]).lease_expires_at
    with session.begin():
        assert job_store.renew_leases(session=session, worker_id="d", attempts=attempts,
                                      lease_s=LEASE_S * 2) == {
            ids[1]: "cancelling", ids[2]: "running"}
        # a stale attempt number renews nothing
        assert job_store.renew_leases(session=session, worker_id="d", attempts={ids[2]: 2},
                                      lease_s=LEASE_S) == {}
    assert reread(sessions, ids[2]).lease_expires_at > before
    assert reread(sessions, ids[0]).lease_owner == "other"


SHORT_LEASE_S = 1.0
POSTGRES_ONLY = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


@POSTGRES_ONLY
@pytest.mark.parametrize("idle_timeout_s", [0.0, 1.0], ids=["no limit", "1 s"])
def test_a_dispatcher_paused_mid_write_keeps_no_lock_past_the_idle_timeout(
        db_url, sessions, session, alice, idle_timeout_s):  # noqa: ANN001
    """A dispatcher paused (SIGSTOP, a stalled VM) between a write to its job's row and the
    commit holds that row's lock, and the reclaim of a lapsed lease skips locked rows: with no
    limit no other dispatcher can take the job over for as long as the pause lasts (the
    cluster test's (e) pause timed out this way). The dispatcher's engine ends a connection
    idle inside a transaction (``engine_timeouts(dispatcher=True)``: the lease length unless
    set), which releases the lock: the job is taken over within about that timeout, and the
    paused write, once resumed, fails instead of landing."""
    job = submit_to_store(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="dispatcher-a", lease_s=SHORT_LEASE_S)
    settings = Settings(database_url=db_url, lease_s=LEASE_S,
                        db_idle_in_transaction_timeout_s=idle_timeout_s)
    timeouts = engine_timeouts(settings, dispatcher=True)
    assert timeouts["idle_in_transaction_timeout_s"] == idle_timeout_s
    stalled_engine = make_engine(db_url, **timeouts)
    paused = session_factory(stalled_engine)()
    try:
        paused.begin()
        assert job_store.renew_leases(session=paused, worker_id="dispatcher-a", attempts={
            job.id: 1}, lease_s=SHORT_LEASE_S) == {job.id: "running"}
        # ... and is paused here, before its commit, while the lease it holds lapses

        def reclaim():  # noqa: ANN202
            with session.begin():
                return claims.claim_next_job(session=session, worker_id="dispatcher-b",
                                             lease_s=LEASE_S)

        started = time.monotonic()
        if not idle_timeout_s:
            deadline = started + SHORT_LEASE_S + 2.0
            while time.monotonic() < deadline:
                assert reclaim() is None  # the row stays locked: nobody takes the job over
                time.sleep(0.2)
            paused.rollback()  # resumed; the job is reclaimed at once
            assert reclaim().lease_owner == "dispatcher-b"
            return
        taken = wait_until(reclaim, 10.0, "dispatcher-b reclaiming the job", interval_s=0.1)
        waited = time.monotonic() - started
        assert (taken.lease_owner, taken.attempt, taken.interruptions) == ("dispatcher-b", 1, 1)
        assert waited < SHORT_LEASE_S + 3 * idle_timeout_s, waited
        with pytest.raises(DBAPIError, match="idle-in-transaction timeout") as ended:
            paused.commit()  # resumed: its connection is gone, and the write with it
        assert transient(ended.value)  # a writer retries on a new connection: fenced there
        paused.close()
        assert reread(sessions, job.id).lease_owner == "dispatcher-b"
    finally:  # a failure halfway must not leave the job's row locked for the next test
        try:
            paused.close()
        except DBAPIError:  # its connection was ended by the server
            pass
        stalled_engine.dispose()


def test_only_the_dispatchers_engine_bounds_idle_transactions_by_default_the_lease():
    settings = Settings(lease_s=12.0)
    assert "idle_in_transaction_timeout_s" not in engine_timeouts(settings)
    assert engine_timeouts(settings, dispatcher=True)["idle_in_transaction_timeout_s"] == 12.0
    assert engine_timeouts(settings.model_copy(update={"db_idle_in_transaction_timeout_s": 0.0}),
                           dispatcher=True)["idle_in_transaction_timeout_s"] == 0.0


@POSTGRES_ONLY
def test_the_embedded_dispatcher_gets_its_own_connections_with_the_idle_limit(
        db_url, engine, monkeypatch):  # noqa: ANN001
    """``metaserve serve`` with its dispatcher on PostgreSQL: the dispatcher's sessions come
    from an engine of its own whose connections carry the idle-in-transaction limit (the
    lease); the API's connections do not, and the engine is disposed when the app stops."""
    from sqlalchemy import text

    from metaserve.api import app as app_module
    from metaserve.service import dispatcher as dispatcher_module

    given = {}

    class Recorder:
        def __init__(self, settings, session_factory, **kwargs):  # noqa: ANN001, ANN003
            given["sessions"] = session_factory

        def start(self) -> None:
            pass

        def stop(self) -> None:
            given["stopped"] = True

    monkeypatch.setattr(dispatcher_module, "Dispatcher", Recorder)
    application = app_module.create_app(Settings(database_url=db_url, lease_s=7.0))
    app_module._start_dispatcher(application)
    try:
        with given["sessions"]() as session:
            assert session.execute(text("show idle_in_transaction_session_timeout")).scalar() == "7s"
        with application.state.session_factory() as session:
            assert session.execute(text("show idle_in_transaction_session_timeout")).scalar() == "0"
    finally:
        app_module._stop_dispatcher(application)
        application.state.engine.dispose()
    assert given["stopped"] and application.state.dispatcher_engine is None
