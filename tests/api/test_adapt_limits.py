"""``POST /v1/jobs/{id}/adapt`` runs in a bounded pool of its own with a timeout: 503 +
Retry-After when every thread and queue place is taken, 504 when late (the slot stays taken
until the computation really ends); non-finite predictions are a 422 naming the cause."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service import adaptation
from metaserve.service.settings import MAX_BODY_BYTES, Settings
from tests.api.test_adapt import SINE_SPEC, sine_run, sine_task, succeeded_job  # noqa: F401

TIMEOUT_S = 1.0


@pytest.fixture
def client(engine, db_url: str, artifact_root: Path) -> Iterator[TestClient]:  # noqa: ANN001
    settings = Settings(database_url=db_url, dispatcher=False, artifact_root=artifact_root,
                        max_body_bytes=MAX_BODY_BYTES, adapt_concurrency=1, adapt_queue=0,
                        adapt_timeout_s=TIMEOUT_S)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def adapt_body(seed: int = 0, scale: float = 1.0) -> dict:
    support_x, support_y, query_x = sine_task(seed)
    return {"support_x": (support_x * scale).tolist(), "support_y": support_y.tolist(),
            "query_x": (query_x * scale).tolist()}


def test_full_pool_is_503_late_call_is_504_and_the_slot_is_held_until_the_work_ends(
        client, sessions, alice_auth, sine_run, artifact_root, monkeypatch):  # noqa: ANN001
    job_id = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    release, started = threading.Event(), threading.Event()
    real_adapt = adaptation.adapt_job

    def slow_adapt(**kwargs):  # noqa: ANN003, ANN202
        started.set()
        release.wait(30)
        return real_adapt(**kwargs)

    monkeypatch.setattr(adaptation, "adapt_job", slow_adapt)
    answers: dict[str, object] = {}

    def first_call() -> None:
        began = time.monotonic()
        answers["first"] = client.post(f"/v1/jobs/{job_id}/adapt", json=adapt_body(),
                                       headers=alice_auth)
        answers["first_s"] = time.monotonic() - began

    caller = threading.Thread(target=first_call)
    caller.start()
    assert started.wait(10)
    busy = client.post(f"/v1/jobs/{job_id}/adapt", json=adapt_body(), headers=alice_auth)
    caller.join(30)
    late = answers["first"]
    still_busy = client.post(f"/v1/jobs/{job_id}/adapt", json=adapt_body(), headers=alice_auth)
    release.set()
    deadline = time.monotonic() + 10
    while client.app.state.adapt_pool.taken and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(adaptation, "adapt_job", real_adapt)
    after = client.post(f"/v1/jobs/{job_id}/adapt", json=adapt_body(), headers=alice_auth)

    assert (busy.status_code, busy.headers["retry-after"]) == (503, "2")
    assert busy.json()["error"]["code"] == "service_unavailable"
    assert (late.status_code, late.json()["error"]["code"]) == (504, "gateway_timeout")
    assert TIMEOUT_S * 0.9 < answers["first_s"] < TIMEOUT_S + 5
    assert still_busy.status_code == 503  # the timed-out computation still holds its thread
    assert after.status_code == 200, after.text


def test_other_routes_are_served_while_every_adapt_thread_is_busy(
        client, sessions, alice_auth, bob_auth, sine_run, artifact_root, monkeypatch):  # noqa: ANN001
    job_id = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    release, started = threading.Event(), threading.Event()
    monkeypatch.setattr(adaptation, "adapt_job",
                        lambda **_: (started.set(), release.wait(30), {
                            "predictions": [], "labels": None, "steps": 0, "algorithm": "maml"})[2])
    caller = threading.Thread(target=client.post, args=(f"/v1/jobs/{job_id}/adapt",),
                              kwargs={"json": adapt_body(), "headers": alice_auth})
    caller.start()
    try:
        assert started.wait(10)
        began = time.monotonic()
        assert client.get("/v1/jobs", headers=bob_auth).status_code == 200
        assert time.monotonic() - began < 0.5
    finally:
        release.set()
        caller.join(30)


def test_non_finite_predictions_are_422_naming_the_cause(
        client, sessions, alice_auth, sine_run, artifact_root):  # noqa: ANN001
    job_id = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    response = client.post(f"/v1/jobs/{job_id}/adapt", json={**adapt_body(scale=3e37),
                                                              "steps": 5}, headers=alice_auth)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {
        "code": "validation_error",
        "message": "the adaptation diverged: non-finite predictions after 5 inner steps "
                   "(overflow); try fewer steps or inputs of a smaller scale",
        "details": [{"field": "predictions",
                     "message": "non-finite after 5 inner steps (overflow)"}]}
