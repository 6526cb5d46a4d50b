"""Metrics retention (service/metrics_retention.py), SQLite and PostgreSQL: a finished job's
series past the budget keep evenly spaced steps, the last step, the lowest and the highest
value; running and queued jobs and short series are untouched; a second pass at the same
budget deletes nothing; a lower budget downsamples again; the dispatcher's thread runs it."""

from __future__ import annotations

import math
import threading

import pytest
from sqlalchemy import select

from metaserve.service import job_store, metrics_retention
from metaserve.service.dispatcher import Dispatcher
from metaserve.service.metrics_retention import downsample_job, keep_downsampling, retention_pass
from metaserve.service.orm import Job, JobStatus, Metric
from metaserve.service.settings import Settings
from tests.helpers import claim, finish, reread, submit_to_store, wait_until

pytestmark = pytest.mark.dialects  # window functions and the DELETE in each dialect

POINTS = 1000
LOWEST_AT, HIGHEST_AT, NAN_AT = 537, 3, 211  # indices of the loss series' extremes


def loss(index: int) -> float:
    """A falling curve, its lowest value not at its end, its highest near its start."""
    if index == LOWEST_AT:
        return -5.0
    if index == HIGHEST_AT:
        return 100.0
    if index == NAN_AT:
        return math.nan  # stored as NULL: counts as neither extreme
    return 1.0 + 1.0 / (1 + index)


def job_with_metrics(sessions, owner, status: JobStatus | None, points: int = POINTS,  # noqa: ANN001
                     short: int = 50) -> str:
    """A job holding a ``loss`` series of ``points`` points (steps 10 apart) and an ``acc``
    series of ``short``; claimed, then ended with ``status`` (None: left running)."""
    with sessions() as session:
        job_id = submit_to_store(session, owner).id
    assert claim(sessions) == job_id
    with sessions.begin() as session:
        job_store.add_metrics(session=session, job_id=job_id, rows=[
            *((10 * index, "loss", loss(index)) for index in range(points)),
            *((10 * index, "acc", index / short) for index in range(short))])
    if status is not None:
        finish(sessions, job_id, status)
    return job_id


def steps(sessions, job_id: str, name: str) -> list[int]:  # noqa: ANN001
    with sessions() as session:
        return list(session.scalars(select(Metric.step).where(
            Metric.job_id == job_id, Metric.name == name).order_by(Metric.step)))


def test_a_finished_series_keeps_evenly_spaced_steps_its_last_its_lowest_and_highest(
        sessions, alice):  # noqa: ANN001
    job_id = job_with_metrics(sessions, alice, JobStatus.SUCCEEDED)
    updated_at = reread(sessions, job_id).updated_at
    done = retention_pass(sessions, 100)
    # ceil(1000 / 100) = 10: indices 0, 10, ..., 990; the last (999); the lowest (537) and
    # the highest (3) value; the NaN at 211 is not an extreme. 1000 - 103 points deleted.
    kept = {10 * index for index in [*range(0, POINTS, 10), POINTS - 1, LOWEST_AT, HIGHEST_AT]}
    assert steps(sessions, job_id, "loss") == sorted(kept)
    assert len(kept) == 100 + metrics_retention.EXTRA_POINTS
    assert steps(sessions, job_id, "acc") == [10 * index for index in range(50)]  # short
    assert (done.jobs, done.deleted) == (1, POINTS - len(kept))
    job = reread(sessions, job_id)
    assert (job.metrics_kept_per_series, job.updated_at) == (100, updated_at)
    with sessions() as session:  # the values are the ones written
        values = dict(session.execute(select(Metric.step, Metric.value).where(
            Metric.job_id == job_id, Metric.name == "loss")).all())
    assert values[10 * LOWEST_AT] == -5.0 and values[10 * HIGHEST_AT] == 100.0
    assert values[10 * (POINTS - 1)] == loss(POINTS - 1)


def test_only_finished_jobs_are_downsampled_whatever_way_they_ended(sessions, alice):  # noqa: ANN001
    running = job_with_metrics(sessions, alice, None)
    ended = {status: job_with_metrics(sessions, alice, status)
             for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)}
    with sessions() as session:  # a queued job holding points (as after a handback)
        queued = submit_to_store(session, alice).id
    with sessions.begin() as session:
        job_store.add_metrics(session=session, job_id=queued,
                              rows=[(step, "loss", 1.0) for step in range(POINTS)])
    done = retention_pass(sessions, 100)
    assert done.jobs == 3
    for job_id in ended.values():
        assert len(steps(sessions, job_id, "loss")) == 103
    assert len(steps(sessions, running, "loss")) == POINTS
    assert len(steps(sessions, queued, "loss")) == POINTS
    assert reread(sessions, running).metrics_kept_per_series is None


def test_a_second_pass_deletes_nothing_a_lower_budget_downsamples_again(sessions, alice):  # noqa: ANN001
    job_id = job_with_metrics(sessions, alice, JobStatus.SUCCEEDED)
    retention_pass(sessions, 100)
    first = steps(sessions, job_id, "loss")
    again = retention_pass(sessions, 100)
    assert (again.jobs, again.deleted) == (0, 0)
    assert downsample_job(sessions, job_id, 100) is None  # marked: nothing to do
    with sessions.begin() as session:
        session.get(Job, job_id).metrics_kept_per_series = None
    assert retention_pass(sessions, 100).deleted == 0  # 103 ≤ 100 + 3: left as it is
    assert steps(sessions, job_id, "loss") == first
    assert retention_pass(sessions, 1000).jobs == 0  # a higher budget brings nothing back
    lower = retention_pass(sessions, 20)
    assert lower.jobs == 1
    assert len(steps(sessions, job_id, "loss")) <= 20 + 3  # from 103
    assert steps(sessions, job_id, "loss")[-1] == 10 * (POINTS - 1)
    assert 10 * LOWEST_AT in steps(sessions, job_id, "loss")
    assert reread(sessions, job_id).metrics_kept_per_series == 20


def test_budget_zero_keeps_every_point_and_a_series_at_the_budget_is_whole(sessions, alice):  # noqa: ANN001
    job_id = job_with_metrics(sessions, alice, JobStatus.SUCCEEDED, points=103)
    assert retention_pass(sessions, 0).jobs == 0
    assert reread(sessions, job_id).metrics_kept_per_series is None
    done = retention_pass(sessions, 100)
    assert (done.jobs, done.deleted) == (1, 0)  # 103 points: within the slack
    assert len(steps(sessions, job_id, "loss")) == 103
    with pytest.raises(ValueError, match="budget"):
        downsample_job(sessions, job_id, 0)


def test_a_job_whose_delete_the_database_refuses_is_skipped_and_left_for_the_next_pass(
        sessions, alice, monkeypatch):  # noqa: ANN001
    import psycopg.errors
    from sqlalchemy.exc import OperationalError

    slow, fine = (job_with_metrics(sessions, alice, JobStatus.SUCCEEDED) for _ in range(2))
    delete_surplus = metrics_retention._delete_surplus

    def statement_timeout_on_slow(session_factory, values, sqlite):  # noqa: ANN001, ANN202
        if values["job_id"] == slow:
            raise OperationalError("DELETE", {}, psycopg.errors.QueryCanceled(
                "canceling statement due to statement timeout"))
        return delete_surplus(session_factory, values, sqlite)

    monkeypatch.setattr(metrics_retention, "_delete_surplus", statement_timeout_on_slow)
    done = retention_pass(sessions, 100)
    assert (done.jobs, done.skipped) == (1, 1)
    assert reread(sessions, slow).metrics_kept_per_series is None
    assert len(steps(sessions, fine, "loss")) == 103
    monkeypatch.setattr(metrics_retention, "_delete_surplus", delete_surplus)
    assert retention_pass(sessions, 100).jobs == 1  # the next pass does it
    assert len(steps(sessions, slow, "loss")) == 103


def test_sqlite_deletes_a_series_a_chunk_of_ids_a_transaction(sessions, alice, monkeypatch):  # noqa: ANN001
    """On SQLite the write lock is taken per chunk (here 100 ids): the same points kept."""
    monkeypatch.setattr(metrics_retention, "SQLITE_DELETE_CHUNK", 100)
    job_id = job_with_metrics(sessions, alice, JobStatus.SUCCEEDED)
    assert retention_pass(sessions, 100).deleted == POINTS - 103
    assert len(steps(sessions, job_id, "loss")) == 103
    assert steps(sessions, job_id, "loss")[-1] == 10 * (POINTS - 1)


def test_a_pass_walks_every_finished_job_past_one_read(sessions, alice, monkeypatch):  # noqa: ANN001
    monkeypatch.setattr(metrics_retention, "CANDIDATES", metrics_retention.CANDIDATES.limit(2))
    monkeypatch.setattr(metrics_retention, "CANDIDATES_PER_READ", 2)
    jobs = [job_with_metrics(sessions, alice, JobStatus.SUCCEEDED, points=30, short=1)
            for _ in range(5)]
    done = retention_pass(sessions, 10)
    assert done.jobs == 5
    assert all(len(steps(sessions, job_id, "loss")) <= 13 for job_id in jobs)


def test_the_dispatchers_retention_thread_downsamples_until_stopped(sessions, alice, db_url):  # noqa: ANN001
    job_id = job_with_metrics(sessions, alice, JobStatus.SUCCEEDED)
    settings = Settings(database_url=db_url, metrics_max_points_per_series=100,
                        metrics_retention_interval_s=0.2)
    dispatcher = Dispatcher(settings, sessions)
    thread = threading.Thread(target=dispatcher._retain_metrics, daemon=True)
    thread.start()
    try:
        wait_until(lambda: reread(sessions, job_id).metrics_kept_per_series, 30,
                   "the retention pass")
        assert len(steps(sessions, job_id, "loss")) == 103
    finally:
        dispatcher._stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_keep_downsampling_skips_passes_at_budget_zero(sessions, alice, db_url):  # noqa: ANN001
    job_id = job_with_metrics(sessions, alice, JobStatus.SUCCEEDED)
    settings = Settings(database_url=db_url, metrics_max_points_per_series=0,
                        metrics_retention_interval_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=keep_downsampling, args=(sessions, settings, stop))
    thread.start()
    stop.wait(0.5)
    stop.set()
    thread.join(10)
    assert len(steps(sessions, job_id, "loss")) == POINTS
