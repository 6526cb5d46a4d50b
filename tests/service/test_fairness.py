"""Fair claim order across users and the per-user running cap (store level, both databases)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from metaserve.service import claims, job_store
from metaserve.service.orm import Job, JobStatus, User
from metaserve.service.claims import waiting_message
from tests.helpers import LEASE_S, make_user, reread
from tests.helpers import submit_to_store as submit

pytestmark = pytest.mark.dialects  # the fair claim is SQL that differs between the dialects

CAP = 2
WAITING_ALICE = "waiting: alice already runs 2 jobs (METASERVE_MAX_RUNNING_JOBS_PER_USER)"


def claim(session, cap: int = 0, worker_id: str = "w1") -> Job | None:  # noqa: ANN001
    with session.begin():
        return claims.claim_next_job(session=session, worker_id=worker_id, lease_s=LEASE_S,
                                     max_running_per_user=cap)


def finish(session, job: Job, worker_id: str = "w1") -> None:  # noqa: ANN001
    with session.begin():
        job_store.finish_job(session=session, job_id=job.id, worker_id=worker_id,
                             status=JobStatus.SUCCEEDED)


def claim_order_with_one_slot(session, cap: int = 0) -> list[str]:  # noqa: ANN001
    """Claim, finish, claim, ... until nothing is claimable: the order jobs were claimed in."""
    order = []
    while (job := claim(session, cap)) is not None:
        order.append(job.id)
        finish(session, job)
    return order


def test_a_later_user_is_claimed_before_the_third_job_of_a_user_who_queued_five(
        session, alice, bob):
    long_jobs = [submit(session, alice, iterations=100_000).id for _ in range(5)]
    short_job = submit(session, bob, iterations=10).id
    assert claim_order_with_one_slot(session) == [long_jobs[0], short_job, *long_jobs[1:]]


def test_users_with_equal_running_jobs_take_turns_oldest_job_first_within_a_user(
        sessions, session, alice, bob):
    carol = make_user(sessions, "carol")[0]
    submitted = {owner.name: [submit(session, owner).id for _ in range(3)]
                 for owner in (alice, bob, carol)}
    assert claim_order_with_one_slot(session) == [
        submitted[name][index] for index in range(3) for name in ("alice", "bob", "carol")]


def test_the_user_with_fewest_running_jobs_is_claimed_first(session, alice, bob):
    for _ in range(3):
        submit(session, alice)
    bobs = [submit(session, bob).id for _ in range(2)]
    first, second = claim(session), claim(session)  # alice's oldest, then bob's (his turn)
    assert second.id == bobs[0] and first.owner_id == alice.id
    third = claim(session)  # both run 1; alice's turn came longest ago
    assert third.owner_id == alice.id
    assert claim(session).id == bobs[1]  # alice runs 2, bob 1


def test_an_expired_lease_is_recovered_before_any_queued_job(session, alice, bob):
    stalled = submit(session, alice)
    with session.begin():
        claims.claim_next_job(session=session, worker_id="dead", lease_s=-1.0)
    submit(session, bob)
    reclaimed = claim(session, cap=1)  # alice runs 1 = the cap: a reclaim is not a new run
    # a lapsed lease is an interruption, not an attempt
    assert (reclaimed.id, reclaimed.attempt, reclaimed.interruptions) == (stalled.id, 1, 1)


def test_a_user_at_the_running_cap_waits_with_the_reason_until_one_of_their_jobs_ends(
        sessions, session, alice):
    first, second, third = (submit(session, alice) for _ in range(3))
    assert [claim(session, CAP).id, claim(session, CAP).id] == [first.id, second.id]
    assert claim(session, CAP) is None
    with session.begin():
        waiting = job_store.get_job_row(session=session, job_id=third.id, owner=alice)
    assert (waiting.status, waiting.message) == ("queued", WAITING_ALICE)
    assert waiting_message("alice", CAP) == WAITING_ALICE
    finish(session, reread(sessions, first.id))
    claimed = claim(session, CAP)
    assert (claimed.id, claimed.status, claimed.message) == (third.id, "running", None)


def test_the_waiting_message_is_written_once_not_on_every_claim(sessions, session, alice):
    for _ in range(CAP):
        submit(session, alice)
    queued = [submit(session, alice).id for _ in range(3)]
    claim(session, CAP), claim(session, CAP)
    assert claim(session, CAP) is None
    marked = {job_id: reread(sessions, job_id).updated_at for job_id in queued}
    for _ in range(5):
        assert claim(session, CAP) is None
    assert {job_id: reread(sessions, job_id).updated_at for job_id in queued} == marked
    assert {reread(sessions, job_id).message for job_id in queued} == {WAITING_ALICE}


def test_other_users_are_claimed_while_one_is_at_the_running_cap(session, alice, bob):
    alices = [submit(session, alice).id for _ in range(4)]
    bobs = [submit(session, bob).id for _ in range(3)]
    claimed = []
    while (job := claim(session, CAP)) is not None:
        claimed.append(job.id)
    assert claimed == [alices[0], bobs[0], alices[1], bobs[1]]


def test_excluded_jobs_are_passed_over_in_the_fair_order(session, alice, bob):
    alices = [submit(session, alice).id for _ in range(2)]
    submit(session, bob)
    with session.begin():
        job = claims.claim_next_job(session=session, worker_id="w1", lease_s=LEASE_S,
                                    exclude=[alices[0]])
    assert job.id == alices[1]


def test_an_admin_is_exempt_from_the_running_cap(session, admin):
    for _ in range(CAP + 2):
        submit(session, admin)
    assert all(claim(session, CAP) is not None for _ in range(CAP + 2))


def test_concurrent_claimers_never_exceed_the_running_cap_and_claim_each_job_once(
        sessions, alice, bob):
    with sessions() as session:
        for _ in range(15):
            for owner in (alice, bob):
                submit(session, owner)
    claimers, rounds = 6, 4
    running_after_each_round: list[Counter] = []

    def count_running() -> None:  # run by one thread while every claimer waits
        with sessions() as session:
            running_after_each_round.append(Counter(dict(session.execute(
                select(User.name, func.count()).join(Job, Job.owner_id == User.id)
                .where(Job.status == "running").group_by(User.name)).all())))

    claimed_all, finish_all = (threading.Barrier(claimers, action=count_running),
                               threading.Barrier(claimers))
    claims: list[str] = []
    errors: list[BaseException] = []

    def claimer(worker_id: str) -> None:
        try:
            with sessions() as own_session:  # its own connection
                for _ in range(rounds):  # all claim at once to the cap, then one job ends
                    finish_all.wait()
                    mine = []
                    while (job := claim(own_session, CAP, worker_id)) is not None:
                        mine.append(job)
                    claims.extend(job.id for job in mine)
                    claimed_all.wait()
                    for job in mine[:1]:
                        finish(own_session, job, worker_id)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(exc)
            claimed_all.abort(), finish_all.abort()

    threads = [threading.Thread(target=claimer, args=(f"w{index}",)) for index in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(claims) == len(set(claims))  # each job claimed once
    # Every round filled both users to the cap, never above it (a finished job freed a slot).
    assert running_after_each_round == [Counter({"alice": CAP, "bob": CAP})] * rounds
    with sessions() as session:
        assert set(session.scalars(select(Job.attempt).where(Job.status != "queued"))) == {1}
