"""Per-user quotas through the API: the queued cap (429 + Retry-After, nothing stored) and the
running cap's reason on a waiting job."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from metaserve.api.app import create_app
from metaserve.service import claims, jobs
from metaserve.service.exceptions import QuotaExceeded
from metaserve.service.orm import Job, JobStatusEvent
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}
QUEUED_CAP, RUNNING_CAP, RETRY_AFTER_S = 2, 1, 45


@pytest.fixture
def client(engine, db_url: str, artifact_root: Path) -> Iterator[TestClient]:  # noqa: ANN001
    settings = Settings(database_url=db_url, dispatcher=False, artifact_root=artifact_root,
                        max_queued_jobs_per_user=QUEUED_CAP,
                        max_running_jobs_per_user=RUNNING_CAP,
                        quota_retry_after_s=RETRY_AFTER_S)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post(client: TestClient, auth: dict[str, str], key: str | None = None,
         **spec) -> object:  # noqa: ANN003
    headers = {**auth, **({"Idempotency-Key": key} if key else {})}
    return client.post("/v1/jobs", json={**TWO_LINE_SPEC, **spec}, headers=headers)


def stored(sessions) -> tuple[int, int]:  # noqa: ANN001
    with sessions() as session:
        return (session.scalar(select(func.count()).select_from(Job)),
                session.scalar(select(func.count()).select_from(JobStatusEvent)))


def test_a_submit_beyond_the_queued_cap_is_429_with_retry_after_and_stores_nothing(
        client, sessions, alice_auth):
    assert [post(client, alice_auth, seed=seed).status_code for seed in range(QUEUED_CAP)] == [
        201, 201]
    response = post(client, alice_auth, key="one-more", seed=99)
    assert response.status_code == 429
    assert response.headers["retry-after"] == str(RETRY_AFTER_S)
    assert response.json() == {"error": {
        "code": "quota_exceeded",
        "message": "alice has 2 queued jobs, the most METASERVE_MAX_QUEUED_JOBS_PER_USER "
                   "allows; submit again when one has started",
        "details": [{"field": "limit", "message": "METASERVE_MAX_QUEUED_JOBS_PER_USER"},
                    {"field": "count", "message": "2"},
                    {"field": "cap", "message": "2"}]}}
    assert stored(sessions) == (QUEUED_CAP, QUEUED_CAP)
    # The key was not used up: once there is room, the same request makes its job.
    first = client.get("/v1/jobs", headers=alice_auth).json()["data"][-1]
    assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=alice_auth).status_code == 200
    assert post(client, alice_auth, key="one-more", seed=99).status_code == 201


@pytest.mark.dialects
def test_an_idempotent_replay_at_the_queued_cap_returns_its_job_not_429(
        client, sessions, alice_auth):
    first = post(client, alice_auth, key="k1")
    post(client, alice_auth, seed=1)
    replay = post(client, alice_auth, key="k1")
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json() == first.json()
    assert stored(sessions) == (QUEUED_CAP, QUEUED_CAP)


def test_the_queued_cap_is_per_user_and_admins_are_exempt(client, alice_auth, bob_auth,
                                                          admin_auth):
    for seed in range(QUEUED_CAP):
        post(client, alice_auth, seed=seed)
    assert post(client, alice_auth, seed=9).status_code == 429
    assert post(client, bob_auth).status_code == 201
    assert [post(client, admin_auth, seed=seed).status_code
            for seed in range(QUEUED_CAP + 1)] == [201] * (QUEUED_CAP + 1)


def test_running_jobs_do_not_count_toward_the_queued_cap(client, sessions, alice_auth):
    ids = [post(client, alice_auth, seed=seed).json()["id"] for seed in range(QUEUED_CAP)]
    with sessions.begin() as session:
        claimed = claims.claim_next_job(session=session, worker_id="w1", lease_s=30.0)
    assert claimed.id == ids[0]
    assert post(client, alice_auth, seed=9).status_code == 201


def test_a_job_over_the_running_cap_says_why_it_waits_in_get(client, sessions, alice_auth):
    ids = [post(client, alice_auth, seed=seed).json()["id"] for seed in range(2)]
    with sessions() as session:
        for _ in range(2):
            with session.begin():
                claims.claim_next_job(session=session, worker_id="w1", lease_s=30.0,
                                      max_running_per_user=RUNNING_CAP)
    running, waiting = (client.get(f"/v1/jobs/{job_id}", headers=alice_auth).json()
                        for job_id in ids)
    assert (running["status"], running["message"]) == ("running", None)
    assert (waiting["status"], waiting["message"]) == (
        "queued", "waiting: alice already runs 1 jobs (METASERVE_MAX_RUNNING_JOBS_PER_USER)")


@pytest.mark.dialects
def test_concurrent_submits_of_one_user_never_pass_the_queued_cap(sessions, alice):
    cap, submitters = 5, 8
    start = threading.Barrier(submitters)
    outcomes: list[str] = []

    def submitter(seed: int) -> None:
        start.wait()
        with sessions() as session:  # its own connection
            for attempt in range(2):
                try:
                    jobs.submit_job(session=session, owner=alice, max_queued=cap,
                                    spec=JobSpec.model_validate(
                                        {**TWO_LINE_SPEC, "seed": seed * 10 + attempt}))
                    outcomes.append("stored")
                except QuotaExceeded:
                    outcomes.append("429")
                except BaseException as exc:  # noqa: BLE001 - shown by the assert below
                    outcomes.append(repr(exc))

    threads = [threading.Thread(target=submitter, args=(index,)) for index in range(submitters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert Counter(outcomes) == {"stored": cap, "429": 2 * submitters - cap}
    assert stored(sessions) == (cap, cap)
