from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from metaserve.service import claims, job_store, jobs
from metaserve.service.exceptions import (IdempotencyConflict, InvalidTransition, JobNotFound,
                                          LeaseLost)
from metaserve.service.orm import Job, JobStatus, utcnow
from metaserve.workers.spec import JobSpec
from tests.helpers import LEASE_S, TWO_LINE_SPEC, reread
from tests.helpers import submit_to_store as submit

pytestmark = pytest.mark.dialects  # claims, locks and transitions: the SQL differs

EXPIRED = -1.0  # a lease that is already over when taken: the holder "died"


def test_job_status_terminal_states_are_exactly_succeeded_failed_cancelled():
    assert {status for status in JobStatus if status.is_terminal()} == {
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def test_submit_stores_queued_job_with_defaults_filled(session, alice):
    job = submit(session, alice)
    assert (job.status, job.attempt, job.max_attempts, job.name, job.progress) == (
        "queued", 0, 3, "maml-sine", {})
    assert job.spec == JobSpec.model_validate(TWO_LINE_SPEC).model_dump(mode="json")
    assert len(job.id) == 26


def test_idempotency_key_with_same_spec_returns_the_same_job(session, alice):
    first = submit(session, alice, key="k1")
    second, created = jobs.submit_job(session=session, owner=alice,
                                      spec=JobSpec.model_validate(TWO_LINE_SPEC),
                                      idempotency_key="k1")
    assert (second.id, created) == (first.id, False)
    assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_idempotency_key_with_other_spec_conflicts(session, alice):
    first = submit(session, alice, key="k1")
    with pytest.raises(IdempotencyConflict) as info:
        submit(session, alice, key="k1", iterations=5)
    assert info.value.details == {"job_id": first.id}


def test_idempotency_keys_are_per_owner(session, alice, bob):
    assert submit(session, alice, key="k1").id != submit(session, bob, key="k1").id


def test_get_job_of_another_user_is_not_found_but_admin_sees_it(session, alice, bob, admin):
    job = submit(session, alice)
    with pytest.raises(JobNotFound):
        with session.begin():
            job_store.get_job_row(session=session, job_id=job.id, owner=bob)
    with session.begin():
        assert job_store.get_job_row(session=session, job_id=job.id, owner=admin).id == job.id


def test_claim_takes_oldest_queued_job_with_a_lease(session, alice):
    first, _second = submit(session, alice), submit(session, alice)
    before = utcnow()
    with session.begin():
        job = claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    assert (job.id, job.status, job.attempt, job.lease_owner) == (first.id, "running", 1, "w1")
    assert before + timedelta(seconds=LEASE_S - 1) < job.lease_expires_at
    assert job.lease_expires_at <= utcnow() + timedelta(seconds=LEASE_S)
    assert before <= job.started_at <= utcnow()


def test_claim_skips_job_with_live_lease(session, alice):
    submit(session, alice)
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S) is not None
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w2", lease_s=LEASE_S) is None


def test_expired_lease_is_reclaimed_as_an_interruption_not_an_attempt(sessions, session, alice):
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="dead", lease_s=EXPIRED)
    with session.begin():
        reclaimed = claims.claim_next_job(session=session, worker_id="w2", lease_s=LEASE_S)
    assert (reclaimed.id, reclaimed.status, reclaimed.attempt, reclaimed.interruptions,
            reclaimed.lease_owner) == (job.id, "running", 1, 1, "w2")
    with pytest.raises(LeaseLost):
        with session.begin():
            job_store.renew_lease(session=session, job_id=job.id, worker_id="dead", lease_s=LEASE_S)
    with session.begin():
        job_store.renew_lease(session=session, job_id=job.id, worker_id="w2", lease_s=LEASE_S,
                              attempt=1)


def test_lapsed_leases_never_fail_a_job_past_max_attempts(sessions, session, alice):
    job = submit(session, alice, max_attempts=1)
    for worker in ("dead1", "dead2", "dead3"):
        with session.begin():
            assert claims.claim_next_job(session=session, worker_id=worker,
                                         lease_s=EXPIRED).id == job.id
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w", lease_s=LEASE_S).id == job.id
    stored = reread(sessions, job.id)
    assert (stored.status, stored.attempt, stored.interruptions, stored.lease_owner) == (
        "running", 1, 3, "w")


def test_a_later_attempt_fences_every_write_of_an_earlier_one(sessions, session, alice):
    job = submit(session, alice, max_attempts=3)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w", lease_s=LEASE_S)
    with session.begin():
        job_store.fail_attempt(session=session, job_id=job.id, worker_id="w", error="boom",
                               attempt=1)
    with session.begin():  # the same dispatcher runs attempt 2; attempt 1 is stale
        assert claims.claim_next_job(session=session, worker_id="w", lease_s=LEASE_S).attempt == 2
    stale = [
        lambda: job_store.fence(session=session, job_id=job.id, worker_id="w", attempt=1),
        lambda: job_store.renew_lease(session=session, job_id=job.id, worker_id="w",
                                      lease_s=LEASE_S, attempt=1),
        lambda: job_store.update_progress(session=session, job_id=job.id, worker_id="w",
                                          progress={"iteration": 9}, attempt=1),
        lambda: job_store.finish_job(session=session, job_id=job.id, worker_id="w",
                                     status=JobStatus.SUCCEEDED, attempt=1),
        lambda: job_store.fail_attempt(session=session, job_id=job.id, worker_id="w",
                                       error="late", attempt=1),
        lambda: job_store.release_job(session=session, job_id=job.id, worker_id="w",
                                      message="late", attempt=1, interrupted=True),
    ]
    for write in stale:
        with pytest.raises(LeaseLost), session.begin():
            write()
    stored = reread(sessions, job.id)
    assert (stored.status, stored.attempt, stored.interruptions, stored.progress) == (
        "running", 2, 0, {})
    with session.begin():
        job_store.fence(session=session, job_id=job.id, worker_id="w", attempt=2)


def test_a_handback_counts_an_interruption_and_keeps_the_attempt(sessions, session, alice):
    job = submit(session, alice, max_attempts=1)
    for _ in range(3):
        with session.begin():
            claimed = claims.claim_next_job(session=session, worker_id="w", lease_s=LEASE_S)
        with session.begin():
            job_store.release_job(session=session, job_id=job.id, worker_id="w",
                                  message="draining", attempt=claimed.attempt, interrupted=True)
    stored = reread(sessions, job.id)
    assert (stored.status, stored.attempt, stored.interruptions) == ("queued", 0, 3)
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w", lease_s=LEASE_S).attempt == 1


def test_lease_times_come_from_the_database_clock(sessions, session, alice):
    """The lease is the database's now + lease_s (stored in the column's own format on
    SQLite, so it reads back as a UTC datetime), not the claimer's clock."""
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w", lease_s=100.0)
    with session.begin():
        database_now = session.execute(select(job_store.db_now(session))).scalar_one()
    if isinstance(database_now, str):  # SQLite: the text SQLAlchemy stores datetimes as
        database_now = datetime.fromisoformat(database_now).replace(tzinfo=timezone.utc)
    left = reread(sessions, job.id).lease_expires_at - database_now
    assert timedelta(seconds=98) < left <= timedelta(seconds=100)


def test_reclaimed_cancelling_job_becomes_cancelled(sessions, session, alice):
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="dead", lease_s=EXPIRED)
    with session.begin():
        assert job_store.request_cancel(session=session, job_id=job.id, owner=alice).status == "cancelling"
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w2", lease_s=LEASE_S) is None
    assert reread(sessions, job.id).status == "cancelled"


def test_two_concurrent_claimers_claim_each_of_200_jobs_exactly_once(sessions, alice):
    with sessions() as session:
        submitted = {submit(session, alice).id for _ in range(200)}
    claimed_by: dict[str, list[str]] = {"w1": [], "w2": []}
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def claimer(worker_id: str) -> None:
        try:
            start.wait()
            with sessions() as own_session:  # its own connection, a transaction per claim
                while True:
                    with own_session.begin():
                        job = claims.claim_next_job(session=own_session, worker_id=worker_id,
                                                    lease_s=LEASE_S)
                    if job is None:
                        break
                    claimed_by[worker_id].append(job.id)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(worker,)) for worker in claimed_by]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    all_claims = claimed_by["w1"] + claimed_by["w2"]
    assert sorted(all_claims) == sorted(submitted)  # each exactly once
    assert claimed_by["w1"] and claimed_by["w2"]  # both really competed
    with sessions() as session:
        assert session.execute(select(Job.status, Job.attempt, func.count()).group_by(
            Job.status, Job.attempt)).all() == [("running", 1, 200)]


def test_renew_lease_extends_it_and_shows_a_cancel_request(session, alice):
    job = submit(session, alice)
    with session.begin():
        first_expiry = claims.claim_next_job(session=session, worker_id="w1",
                                             lease_s=1.0).lease_expires_at
    with session.begin():
        job_store.request_cancel(session=session, job_id=job.id, owner=alice)
    with session.begin():
        renewed = job_store.renew_lease(session=session, job_id=job.id, worker_id="w1", lease_s=LEASE_S)
    assert renewed.status == "cancelling"
    assert renewed.lease_expires_at > first_expiry + timedelta(seconds=LEASE_S - 2)


def test_renew_lease_by_another_worker_raises_lease_lost(session, alice):
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    with pytest.raises(LeaseLost) as info:
        with session.begin():
            job_store.renew_lease(session=session, job_id=job.id, worker_id="w2", lease_s=LEASE_S)
    assert info.value.details == {"job_id": job.id, "worker_id": "w2"}


def test_update_progress_sets_progress_and_message(sessions, session, alice):
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    progress = {"iteration": 10, "total": 1000, "tasks_per_s": 250.0, "eta_s": 39.6, "workers": 2}
    with session.begin():
        job_store.update_progress(session=session, job_id=job.id, worker_id="w1", progress=progress,
                                  message="training")
    stored = reread(sessions, job.id)
    assert (stored.progress, stored.message) == (progress, "training")
    with pytest.raises(LeaseLost):
        with session.begin():
            job_store.update_progress(session=session, job_id=job.id, worker_id="w2", progress={})


def test_release_job_requeues_without_counting_the_attempt(sessions, session, alice):
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    message = "waiting for resources: job asks 4 GPUs, cluster has 0"
    with session.begin():
        job_store.release_job(session=session, job_id=job.id, worker_id="w1", message=message)
    stored = reread(sessions, job.id)
    assert (stored.status, stored.attempt, stored.lease_owner, stored.lease_expires_at,
            stored.message) == ("queued", 0, None, None, message)
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w2", lease_s=LEASE_S).attempt == 1


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_finish_job_by_lease_owner_is_terminal_and_never_left(sessions, session, alice, status):
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    with pytest.raises(LeaseLost):
        with session.begin():
            job_store.finish_job(session=session, job_id=job.id, worker_id="w2", status=status)
    with session.begin():
        job_store.finish_job(session=session, job_id=job.id, worker_id="w1", status=status,
                             error="boom" if status is JobStatus.FAILED else None)
    stored = reread(sessions, job.id)
    assert (stored.status, stored.lease_owner, stored.error) == (
        status.value, None, "boom" if status is JobStatus.FAILED else None)
    assert stored.finished_at is not None
    with pytest.raises(LeaseLost):
        with session.begin():
            job_store.finish_job(session=session, job_id=job.id, worker_id="w1", status=JobStatus.SUCCEEDED)
    with pytest.raises(InvalidTransition):
        with session.begin():
            job_store.request_cancel(session=session, job_id=job.id, owner=alice)
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w3", lease_s=EXPIRED) is None


def test_finish_job_refuses_a_non_terminal_status(session, alice):
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    with pytest.raises(InvalidTransition):
        with session.begin():
            job_store.finish_job(session=session, job_id=job.id, worker_id="w1", status=JobStatus.QUEUED)


def test_fail_attempt_requeues_until_max_attempts_then_fails(sessions, session, alice):
    job = submit(session, alice, max_attempts=2)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    with session.begin():
        job_store.fail_attempt(session=session, job_id=job.id, worker_id="w1", error="actor died")
    stored = reread(sessions, job.id)
    assert (stored.status, stored.attempt, stored.error, stored.lease_owner) == (
        "queued", 1, "actor died", None)
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w2", lease_s=LEASE_S).attempt == 2
    with session.begin():
        job_store.fail_attempt(session=session, job_id=job.id, worker_id="w2", error="actor died again")
    stored = reread(sessions, job.id)
    assert (stored.status, stored.attempt, stored.error) == ("failed", 2, "actor died again")
    assert stored.message == "failed: actor died again"


def test_fail_attempt_without_retry_fails_at_once_with_attempts_left(sessions, session, alice):
    job = submit(session, alice, max_attempts=3)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    with session.begin():
        job_store.fail_attempt(session=session, job_id=job.id, worker_id="w1",
                               error="DatasetError: dataset path '/x' does not exist", retry=False)
    stored = reread(sessions, job.id)
    assert (stored.status, stored.attempt, stored.lease_owner, stored.message) == (
        "failed", 1, None, "failed: DatasetError: dataset path '/x' does not exist")


def test_fail_attempt_of_a_cancelling_job_cancels_it(sessions, session, alice):
    job = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S)
    with session.begin():
        job_store.request_cancel(session=session, job_id=job.id, owner=alice)
    with session.begin():
        job_store.fail_attempt(session=session, job_id=job.id, worker_id="w1", error="stopped")
    assert reread(sessions, job.id).status == "cancelled"


def test_cancel_queued_job_is_immediate_and_running_job_goes_cancelling(session, alice):
    queued, running = submit(session, alice), submit(session, alice)
    with session.begin():
        job_store.request_cancel(session=session, job_id=queued.id, owner=alice)  # before the claim
    with session.begin():
        assert claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S).id == running.id
    with session.begin():
        cancelled = job_store.get_job_row(session=session, job_id=queued.id, owner=alice)
    assert (cancelled.status, cancelled.finished_at is not None) == ("cancelled", True)
    with session.begin():
        cancelling = job_store.request_cancel(session=session, job_id=running.id, owner=alice)
    assert (cancelling.status, cancelling.lease_owner) == ("cancelling", "w1")
    with session.begin():
        again = job_store.request_cancel(session=session, job_id=running.id, owner=alice)
    assert again.status == "cancelling"


def test_cancel_of_another_users_job_is_not_found(session, alice, bob):
    job = submit(session, alice)
    with pytest.raises(JobNotFound):
        with session.begin():
            job_store.request_cancel(session=session, job_id=job.id, owner=bob)
    with session.begin():
        assert job_store.get_job_row(session=session, job_id=job.id, owner=alice).status == "queued"


def test_add_metrics_ignores_rewritten_steps(session, alice):
    job = submit(session, alice)
    with session.begin():
        assert job_store.add_metrics(session=session, job_id=job.id,
                                     rows=[(0, "loss", 1.0), (1, "loss", 0.5), (0, "acc", 0.1)]) == 3
    with session.begin():
        assert job_store.add_metrics(session=session, job_id=job.id,
                                     rows=[(1, "loss", 99.0), (2, "loss", 0.25)]) == 1
    with session.begin():
        rows = job_store.get_metrics(session=session, job_id=job.id)
    assert [(m.name, m.step, m.value) for m in rows] == [
        ("acc", 0, 0.1), ("loss", 0, 1.0), ("loss", 1, 0.5), ("loss", 2, 0.25)]
    with session.begin():
        since = job_store.get_metrics(session=session, job_id=job.id, name="loss", since_step=0)
    assert [(m.step, m.value) for m in since] == [(1, 0.5), (2, 0.25)]


def test_add_artifact_upserts_by_name(session, alice):
    job = submit(session, alice)
    with session.begin():
        job_store.add_artifact(session=session, job_id=job.id, name="meta_init.safetensors", size=10,
                               sha256="a" * 64, media_type="application/octet-stream")
    with session.begin():
        job_store.add_artifact(session=session, job_id=job.id, name="meta_init.json", size=3,
                               sha256="c" * 64, media_type="application/json")
    with session.begin():
        job_store.add_artifact(session=session, job_id=job.id, name="meta_init.safetensors", size=20,
                               sha256="b" * 64, media_type="application/octet-stream")
    with session.begin():
        assert [(a.name, a.size, a.sha256) for a in job_store.list_artifacts(session=session,
                                                                             job_id=job.id)] == [
            ("meta_init.json", 3, "c" * 64), ("meta_init.safetensors", 20, "b" * 64)]
