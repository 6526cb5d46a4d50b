"""``POST /v1/jobs/{id}/adapt`` computes in adapt processes of its own (bounded, with a
timeout): 503 + Retry-After when every process and queue place is taken, 504 when late (the
late computation's process is killed, so its slot frees at once), 503 when a process dies (it
is replaced); non-finite predictions are a 422 naming the cause; no process outlives the app."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service.adapt_pool import AdaptProcess
from metaserve.service.settings import MAX_BODY_BYTES, Settings
from metaserve.workers.engine import Trainer
from tests.helpers import SINE_SPEC, sine_task, succeeded_job

# Each test waits on adapt processes' start-up and timeouts by design.
pytestmark = pytest.mark.slow

TIMEOUT_S = 10.0
# Adapting this MLP to 1,000 points for 100 steps takes about a minute on one thread: far
# past TIMEOUT_S on any CPU (a small adaptation, loading included, takes well under it).
WIDE_SPEC = {**SINE_SPEC, "model": {"name": "mlp", "hidden": [2048, 2048]}, "meta_batch_size": 1,
             "iterations": 1}
SLOW_BODY = {"support_x": [[i / 100 - 5] for i in range(1000)],
             "support_y": [[0.5] for _ in range(1000)], "query_x": [[0.0]], "steps": 100}


@pytest.fixture
def client(engine, db_url: str, artifact_root: Path) -> Iterator[TestClient]:  # noqa: ANN001
    settings = Settings(database_url=db_url, dispatcher=False, artifact_root=artifact_root,
                        max_body_bytes=MAX_BODY_BYTES, adapt_concurrency=1, adapt_queue=0,
                        adapt_timeout_s=TIMEOUT_S)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("wide-run")
    Trainer(WIDE_SPEC).run(directory)
    return directory


def adapt_body(seed: int = 0, scale: float = 1.0) -> dict:
    support_x, support_y, query_x = sine_task(seed)
    return {"support_x": (support_x * scale).tolist(), "support_y": support_y.tolist(),
            "query_x": (query_x * scale).tolist()}


def slow_call_in_background(client: TestClient, job_id: str,
                             auth: dict[str, str]) -> tuple[threading.Thread, dict]:
    """A slow adapt call on its way, returned once its process computes it."""
    answer: dict = {}

    def call() -> None:
        began = time.monotonic()
        answer["response"] = client.post(f"/v1/jobs/{job_id}/adapt", json=SLOW_BODY, headers=auth)
        answer["s"] = time.monotonic() - began

    caller = threading.Thread(target=call)
    caller.start()
    pool = client.app.state.adapt_pool
    deadline = time.monotonic() + 120
    while not (pool.taken and pool.process_ids()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.taken == 1 and pool.process_ids(), "the slow call never reached a process"
    return caller, answer


def test_full_pool_is_503_other_routes_are_served_and_a_late_call_is_504_with_its_process_killed(
        client, sessions, alice_auth, bob_auth, sine_run, wide_run, artifact_root):  # noqa: ANN001
    small = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    wide = succeeded_job(client, sessions, alice_auth, WIDE_SPEC, wide_run, artifact_root)
    caller, answer = slow_call_in_background(client, wide, alice_auth)
    [slow_pid] = client.app.state.adapt_pool.process_ids()
    busy = client.post(f"/v1/jobs/{small}/adapt", json=adapt_body(), headers=alice_auth)
    began = time.monotonic()
    other_route = client.get("/v1/jobs", headers=bob_auth)
    other_route_s = time.monotonic() - began
    caller.join(60)
    late = answer["response"]
    after = client.post(f"/v1/jobs/{small}/adapt", json=adapt_body(), headers=alice_auth)

    assert (busy.status_code, busy.headers["retry-after"]) == (503, "2")
    assert busy.json()["error"]["code"] == "service_unavailable"
    assert other_route.status_code == 200 and other_route_s < 0.5
    assert (late.status_code, late.json()["error"]["code"]) == (504, "gateway_timeout")
    assert late.json()["error"]["message"] == (
        f"the adaptation did not finish within {TIMEOUT_S:g} s; try fewer steps or smaller arrays")
    assert not pid_alive(slow_pid)  # killed with its computation: the slot was free at once
    assert after.status_code == 200, after.text
    assert client.app.state.adapt_pool.process_ids() != [slow_pid]


def test_a_dead_adapt_process_is_503_and_replaced(
        client, sessions, alice_auth, sine_run, wide_run, artifact_root):  # noqa: ANN001
    small = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    wide = succeeded_job(client, sessions, alice_auth, WIDE_SPEC, wide_run, artifact_root)
    caller, answer = slow_call_in_background(client, wide, alice_auth)
    [pid] = client.app.state.adapt_pool.process_ids()
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    caller.join(60)
    after = client.post(f"/v1/jobs/{small}/adapt", json=adapt_body(), headers=alice_auth)

    died = answer["response"]
    assert (died.status_code, died.headers["retry-after"]) == (503, "2")
    assert died.json()["error"]["message"] == (
        "The adapt process ended before it answered (e.g. killed for memory); retry later.")
    assert after.status_code == 200, after.text


def test_no_adapt_process_outlives_the_app_or_its_parent(
        engine, db_url, artifact_root, sessions, alice_auth, sine_run):  # noqa: ANN001
    settings = Settings(database_url=db_url, dispatcher=False, artifact_root=artifact_root,
                        max_body_bytes=MAX_BODY_BYTES)
    with TestClient(create_app(settings)) as client:
        job_id = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
        assert client.post(f"/v1/jobs/{job_id}/adapt", json=adapt_body(),
                           headers=alice_auth).status_code == 200
        pids = client.app.state.adapt_pool.process_ids()
    orphan = AdaptProcess(multiprocessing.get_context("spawn"))
    orphan._connection.close()  # what the API process's death does to the pipe

    orphan.process.join(60)
    assert len(pids) == 1 and not pid_alive(pids[0])
    assert orphan.process.exitcode == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
