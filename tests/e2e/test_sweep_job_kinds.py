"""A sweep is a job kind, and each of its trials a job of any kind: through REST on a live
``metaserve serve``, a sweep of RL² jobs and a sweep whose trials run on two inner-loop workers
each; every trial a job with its own status history, metrics, placement and artifacts, and the
sweep's best trial's artifact published as the sweep's."""

from __future__ import annotations

import time
from typing import Iterator

import httpx
import pytest

from tests.server_process import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]

RL2 = {"algorithm": {"name": "rl2", "hidden_size": 16, "lr": 0.02, "num_epochs": 2,
                     "minibatch_trials": 16, "envs_per_runner": 64, "evaluation_trials": 50},
       "task_family": {"name": "bandit", "arms": 2, "pulls": 10}, "meta_batch_size": 64,
       "iterations": 4, "log_every": 2, "checkpoint_every": 2, "evaluation": {"every": 0}}
SHARDED = {"algorithm": {"name": "maml", "first_order": True}, "task_family": {"name": "sine"},
           "model": {"name": "mlp", "hidden": [16, 16]}, "meta_batch_size": 4, "iterations": 8,
           "log_every": 4, "checkpoint_every": 4,
           "evaluation": {"every": 4, "tasks": 10, "inner_steps": [1]},
           "resources": {"workers": 2, "cpus_per_worker": 0.5}}


def run_sweep(client: httpx.Client, body: dict, timeout_s: float = 240.0) -> dict:
    created = client.post("/v1/sweeps", json=body)
    assert created.status_code == 201, created.text
    sweep_id = created.json()["id"]
    deadline = time.monotonic() + timeout_s
    while True:
        sweep = client.get(f"/v1/sweeps/{sweep_id}").json()
        if sweep["status"] in ("succeeded", "failed", "cancelled"):
            return sweep
        assert time.monotonic() < deadline, sweep
        time.sleep(0.5)


def artifact_names(client: httpx.Client, job_id: str) -> set[str]:
    return {a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}


def status_history(client: httpx.Client, job_id: str) -> list[str]:
    """The job's status events from its SSE stream (a finished job's stream closes)."""
    statuses = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        kind = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "status":
                statuses.append(httpx.Response(200, content=line[5:]).json()["status"])
    return statuses


def check_trials(client: httpx.Client, sweep: dict, metric: str, artifacts: set[str]) -> list:
    assert (sweep["status"], sweep["error"]) == ("succeeded", None), sweep
    board = client.get(f"/v1/sweeps/{sweep['id']}/trials").json()["data"]
    assert len(board) == 2 and {t["status"] for t in board} == {"succeeded"}, board
    for trial in board:
        job = client.get(f"/v1/jobs/{trial['job_id']}").json()
        assert (job["sweep_id"], job["status"], job["attempt"]) == (sweep["id"], "succeeded", 1)
        assert status_history(client, job["id"]) == ["running", "succeeded"]
        values = client.get(f"/v1/jobs/{job['id']}/metrics?name={metric}").json()["data"]
        assert values and values[-1]["value"] == trial["value"]
        assert artifacts <= artifact_names(client, job["id"])
    assert artifacts | {"sweep.json"} <= artifact_names(client, sweep["driver_job_id"])
    return board


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One live ``metaserve serve`` (embedded default) for the module's sweeps."""
    server = ServerProcess(tmp_path_factory.mktemp("sweep-kinds")).start()
    try:
        with server.client() as client:
            yield client
    finally:
        server.kill()


def test_a_sweep_of_rl2_jobs_runs_each_trial_as_an_rl_job(client: httpx.Client) -> None:
    sweep = run_sweep(client, {
        "name": "rl2-lr", "spec": RL2, "space": {"algorithm.lr": {"grid": [0.01, 0.03]}},
        "search": {"name": "grid"}, "scheduler": {"name": "fifo"}})
    assert (sweep["config"]["scheduler"]["metric"], sweep["config"]["scheduler"]["mode"]) == (
        "val/rl2_trial_return", "max")
    board = check_trials(client, sweep, "val/rl2_trial_return",
                         {"meta_policy.safetensors", "meta_policy.json"})
    assert {t["config"]["algorithm.lr"] for t in board} == {0.01, 0.03}
    assert sweep["best"]["value"] == max(t["value"] for t in board)


def test_a_sweep_of_two_worker_jobs_shards_each_trial_over_two_workers(
        client: httpx.Client) -> None:
    sweep = run_sweep(client, {
        "name": "sharded", "spec": SHARDED,
        "space": {"algorithm.inner_lr": {"grid": [0.01, 0.1]}},
        "search": {"name": "grid"}, "scheduler": {"name": "fifo"}})
    board = check_trials(client, sweep, "val/loss_step1",
                         {"meta_init.safetensors", "meta_init.json"})
    for trial in board:  # each trial's job sharded its meta-batch over two workers
        progress = client.get(f"/v1/jobs/{trial['job_id']}").json()["progress"]
        workers = progress["placement"]["workers"]
        assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2, progress
