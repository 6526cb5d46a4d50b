"""A sweep through REST, a real dispatcher and Ray Tune (SQLite; the API and validation run on
both databases in tests/api/test_sweeps.py): trials as jobs, ASHA, the leaderboard, the
sweep's artifacts, and cancel with no actor of the sweep left."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service import auth
from metaserve.service.db import make_engine, session_factory
from metaserve.service.orm import Base
from metaserve.service.settings import Settings

pytestmark = pytest.mark.usefixtures("ray_session")

TINY = {"algorithm": {"name": "maml", "first_order": True}, "task_family": {"name": "sine"},
        "model": {"name": "mlp", "hidden": [16, 16]}, "meta_batch_size": 4, "iterations": 12,
        "log_every": 3, "checkpoint_every": 6,
        "evaluation": {"every": 3, "tasks": 10, "inner_steps": [1]},
        "resources": {"workers": 1, "cpus_per_worker": 0.5}}
SWEEP = {"name": "tiny", "spec": TINY,
         "space": {"algorithm.inner_lr": {"grid": [0.003, 0.3]},
                   "outer_optimizer.lr": {"grid": [0.0001, 0.01]}},
         "search": {"name": "grid", "shuffle": True, "seed": 1},  # Tune's order: the resume test
         "scheduler": {"name": "asha", "grace_period": 3, "reduction_factor": 2}}
SWEEP_ACTOR_CLASSES = ("JobSupervisor", "ImplicitFunc", "sweep_trial", "InnerLoopWorker",
                       "RLJobActor")


@pytest.fixture
def served(tmp_path: Path):  # noqa: ANN201
    url = f"sqlite:///{tmp_path / 'metaserve.db'}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    with session_factory(engine)() as session:
        _, key = auth.create_key(session=session, name="alice")
    settings = Settings(database_url=url, artifact_root=tmp_path / "artifacts", data_dir=tmp_path,
                        dispatcher_concurrency=2, sweep_driver_memory_mb=256)
    with TestClient(create_app(settings)) as client:
        yield client, {"Authorization": f"Bearer {key}"}
    engine.dispose()


def wait_for(client, headers, sweep_id: str, done, timeout: float = 150.0) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        sweep = client.get(f"/v1/sweeps/{sweep_id}", headers=headers).json()
        if done(sweep) or time.monotonic() > deadline:
            return sweep
        time.sleep(0.3)


def sweep_actors_alive() -> list[str]:
    import ray

    return [actor["ActorClassName"] for actor in ray._private.state.actors().values()
            if actor["State"] != "DEAD"
            and any(name in actor["ActorClassName"] for name in SWEEP_ACTOR_CLASSES)]


def placement_groups_reserved() -> list[str]:
    """Placement groups still holding resources (Tune makes one per trial)."""
    from ray.util import placement_group_table

    return [pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"]


def test_a_grid_sweep_with_asha_runs_its_trials_as_jobs_and_publishes_the_best(served):  # noqa: ANN001
    client, headers = served
    created = client.post("/v1/sweeps", json=SWEEP, headers=headers)
    assert created.status_code == 201, created.text
    sweep_id = created.json()["id"]
    sweep = wait_for(client, headers, sweep_id, lambda s: s["status"] in
                     ("succeeded", "failed", "cancelled"))
    assert (sweep["status"], sweep["error"]) == ("succeeded", None)
    board = client.get(f"/v1/sweeps/{sweep_id}/trials", headers=headers).json()["data"]
    assert len(board) == 4
    assert {json.dumps(t["config"], sort_keys=True) for t in board} == {
        json.dumps({"algorithm.inner_lr": lr, "outer_optimizer.lr": olr}, sort_keys=True)
        for lr in (0.003, 0.3) for olr in (0.0001, 0.01)}
    assert all(t["status"] in ("succeeded", "cancelled") and t["attempt"] == 1 for t in board)
    finished = [t for t in board if t["status"] == "succeeded"]
    stopped = [t for t in board if t["status"] == "cancelled"]
    assert finished and all(t["step"] == 12 for t in finished)
    assert all("stopped early by asha" in t["message"] and t["step"] < 12 for t in stopped)
    assert all(t["iteration"] == t["step"] for t in board)  # where each stopped, or 12
    values = [t["value"] for t in board]
    assert values == sorted(values)  # min mode: best first
    best = sweep["best"]
    assert best["job_id"] == board[0]["job_id"]
    # Trials are jobs with the job routes' metrics and artifacts.
    jobs = client.get(f"/v1/jobs?sweep={sweep_id}", headers=headers).json()["data"]
    assert sorted(j["id"] for j in jobs) == sorted(t["job_id"] for t in board)
    best_job = finished[0]["job_id"] if board[0]["status"] != "succeeded" else board[0]["job_id"]
    metrics = client.get(f"/v1/jobs/{best_job}/metrics?name=val/loss_step1",
                         headers=headers).json()["data"]
    assert [m["step"] for m in metrics] == [3, 6, 9, 12]
    names = {a["name"] for a in client.get(f"/v1/jobs/{best_job}/artifacts",
                                           headers=headers).json()["data"]}
    assert {"meta_init.safetensors", "meta_init.json"} <= names
    # The sweep's artifacts: the best finished trial's meta_init.* and the leaderboard.
    driver = sweep["driver_job_id"]
    names = {a["name"] for a in client.get(f"/v1/jobs/{driver}/artifacts",
                                           headers=headers).json()["data"]}
    assert {"meta_init.safetensors", "meta_init.json", "sweep.json"} <= names
    summary = client.get(f"/v1/jobs/{driver}/artifacts/sweep.json", headers=headers).json()
    assert summary["best"]["job_id"] == finished[0]["job_id"] == min(
        finished, key=lambda t: t["value"])["job_id"]
    assert len(summary["trials"]) == 4
    # Selected by val/loss_step1; the held-out score beside it is the best trial's own final
    # test/loss_step1, on test tasks no selection used.
    test_series = client.get(f"/v1/jobs/{best_job}/metrics?name=test/loss_step1",
                             headers=headers).json()["data"]
    assert [m["step"] for m in test_series] == [12]  # evaluated once, after the last iteration
    own_test = test_series[0]["value"]
    assert summary["test_metric"] == "test/loss_step1" and summary["test_metric_note"] is None
    assert (summary["best"]["test_metric"], summary["best"]["test_value"],
            summary["best"]["test_note"]) == ("test/loss_step1", own_test, None)
    assert summary["best"]["test_value"] != summary["best"]["value"]  # not the val number again
    best_row = next(t for t in board if t["job_id"] == best_job)
    assert (best_row["test_value"], best_row["test_note"]) == (own_test, None)
    assert (sweep["best"]["job_id"], sweep["best"]["test_value"]) == (best_job, own_test)
    assert best_row["message"] == (f"finished: val/loss_step1 {best_row['value']:.4g}, held-out "
                                   f"test/loss_step1 {own_test:.4g}")
    by_job = {row["job_id"]: row for row in summary["trials"]}
    for trial in finished:  # every finished trial: its own final test metric, in both places
        own = client.get(f"/v1/jobs/{trial['job_id']}/metrics?name=test/loss_step1",
                         headers=headers).json()["data"][-1]["value"]
        assert trial["test_value"] == by_job[trial["job_id"]]["test_value"] == own
    for trial in stopped:  # no final evaluation: no test score, and the reason
        assert trial["test_value"] is None and by_job[trial["job_id"]]["test_value"] is None
        assert trial["test_note"] == by_job[trial["job_id"]]["test_note"] == (
            "none: the trial ended before its final evaluation, the only one of test/loss_step1")
    assert sweep_actors_alive() == []
    deadline = time.monotonic() + 5
    while placement_groups_reserved() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert placement_groups_reserved() == []


def test_a_cancelled_trial_ends_alone_and_a_cancelled_sweep_ends_every_trial_within_5_s(served):  # noqa: ANN001
    client, headers = served
    # Optuna's sampler and the median rule here (its grace period past the test's length):
    # the cancel path does not depend on them, and this runs them once on Ray.
    body = {**SWEEP, "spec": {**TINY, "iterations": 100000, "checkpoint_every": 1000},
            "space": {"algorithm.inner_lr": {"choice": [0.003, 0.3]},
                      "outer_optimizer.lr": {"loguniform": [0.0001, 0.01]}},
            "search": {"name": "optuna", "seed": 0}, "num_samples": 4,
            "scheduler": {"name": "median", "grace_period": 100000}}
    sweep_id = client.post("/v1/sweeps", json=body, headers=headers).json()["id"]
    sweep = wait_for(client, headers, sweep_id, lambda s: s["trials"].get("running", 0) >= 2)
    assert sweep["trials"].get("running", 0) >= 2, sweep
    # One trial's job cancelled: that trial ends, the sweep goes on.
    trial = client.get(f"/v1/sweeps/{sweep_id}/trials", headers=headers).json()["data"][0]
    assert client.post(f"/v1/jobs/{trial['job_id']}/cancel", headers=headers).status_code == 200
    deadline = time.monotonic() + 10
    while client.get(f"/v1/jobs/{trial['job_id']}", headers=headers).json()["status"] not in (
            "cancelled", "succeeded") and time.monotonic() < deadline:
        time.sleep(0.2)
    job = client.get(f"/v1/jobs/{trial['job_id']}", headers=headers).json()
    assert (job["status"], job["message"]) == ("cancelled", "cancelled"), job
    assert client.get(f"/v1/sweeps/{sweep_id}", headers=headers).json()["status"] == "running"
    sweep = wait_for(client, headers, sweep_id, lambda s: s["trials"].get("running", 0) >= 2)
    started = time.monotonic()
    assert client.post(f"/v1/sweeps/{sweep_id}/cancel", headers=headers).status_code == 200
    sweep = wait_for(client, headers, sweep_id, lambda s: s["status"] == "cancelled" and not
                     s["trials"].get("running"), timeout=10)
    elapsed = time.monotonic() - started
    assert sweep["status"] == "cancelled" and elapsed < 5.0, (sweep, elapsed)
    trials = client.get(f"/v1/sweeps/{sweep_id}/trials", headers=headers).json()["data"]
    assert trials and {t["status"] for t in trials} <= {"cancelled", "succeeded"}
    deadline = time.monotonic() + 5
    while (sweep_actors_alive() or placement_groups_reserved()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sweep_actors_alive() == []
    # the killed sweep's trials' CPUs are free again (they stayed reserved until the
    # dispatcher's Ray job ended, and the next tests' jobs could not be placed)
    assert placement_groups_reserved() == []
