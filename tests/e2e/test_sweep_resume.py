"""A sweep survives its server: ``metaserve serve`` (embedded default) is SIGKILLed mid-sweep and
restarted; the sweep finishes, every trial that had finished keeps its result and is not rerun
(one attempt), no trial is lost, and the leaderboard is complete."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow

SPEC = {"algorithm": {"name": "maml", "first_order": True}, "task_family": {"name": "sine"},
        "model": {"name": "mlp", "hidden": [16, 16]}, "meta_batch_size": 4, "iterations": 80,
        "log_every": 10, "checkpoint_every": 20,
        "evaluation": {"every": 20, "tasks": 10, "inner_steps": [1]}}
SWEEP = {"name": "resumed", "spec": SPEC,
         "space": {"algorithm.inner_lr": {"grid": [0.003, 0.03]},
                   "outer_optimizer.lr": {"grid": [0.001, 0.01]}},
         "search": {"name": "grid"}, "scheduler": {"name": "fifo"},
         "max_concurrent_trials": 2}


def test_a_sigkilled_server_finishes_the_sweep_without_rerunning_finished_trials(
        tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        with server.client() as client:
            sweep_id = client.post("/v1/sweeps", json=SWEEP).json()["id"]
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # one read: the sweep and its trials at one moment
                board = client.get(f"/v1/sweeps/{sweep_id}/trials").json()
                sweep, statuses = board["sweep"], [t["status"] for t in board["data"]]
                if "succeeded" in statuses and "running" in statuses:
                    break
                time.sleep(0.2)
            before = {t["job_id"]: t for t in board["data"]}
    finally:  # the kill the test is about, and no server left behind when it fails before
        server.kill()
    assert sweep["status"] == "running", sweep
    finished_before = {job_id: t for job_id, t in before.items() if t["status"] == "succeeded"}
    assert finished_before and any(t["status"] == "running" for t in before.values()), before

    restarted = ServerProcess(tmp_path, port=server.port).start()
    try:
        with restarted.client() as client:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                sweep = client.get(f"/v1/sweeps/{sweep_id}").json()
                if sweep["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            assert (sweep["status"], sweep["attempt"]) == ("succeeded", 1), sweep  # an interruption
            after = {t["job_id"]: t for t in
                     client.get(f"/v1/sweeps/{sweep_id}/trials").json()["data"]}
            jobs = client.get("/v1/jobs", params={"sweep": sweep_id}).json()["data"]
            summary = client.get(f"/v1/jobs/{sweep['driver_job_id']}/artifacts/sweep.json").json()
            own_test = {job_id: client.get(f"/v1/jobs/{job_id}/metrics",
                                           params={"name": "test/loss_step1"}).json()["data"]
                        for job_id in after}
    finally:
        restarted.terminate()
    assert len(after) == 4 and {t["status"] for t in after.values()} == {"succeeded"}
    assert set(before) <= set(after)  # no trial lost
    assert len({tuple(sorted(t["config"].items())) for t in after.values()}) == 4
    for job_id, trial in finished_before.items():  # kept, not rerun
        assert (after[job_id]["attempt"], after[job_id]["value"]) == (1, trial["value"])
    assert all(t["step"] == 80 and t["value"] is not None for t in after.values())
    assert sorted(j["id"] for j in jobs) == sorted(after)
    # The held-out score of every trial, those the first attempt finished included (the
    # resumed driver reads theirs from the database): its own final test/loss_step1.
    assert all([m["step"] for m in series] == [80] for series in own_test.values()), own_test
    reported = {row["job_id"]: row["test_value"] for row in summary["trials"]}
    assert reported == {job_id: series[0]["value"] for job_id, series in own_test.items()}
    assert {job_id: t["test_value"] for job_id, t in after.items()} == reported
    assert summary["best"]["test_value"] == own_test[summary["best"]["job_id"]][0]["value"]
