"""End to end: each meta-RL algorithm (maml on nav2d and on MuJoCo's half-cheetah, rl2 on
bandits, pearl on nav2d) runs through ``POST /v1/jobs`` on the real ``metaserve serve``
embedded default with a short configuration, and its meta-policy downloads and runs on new
tasks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.server_process import ServerProcess
from metaserve.workers.rl import load_meta_policy

pytestmark = pytest.mark.slow

SHORT_JOBS = {
    "maml": {"algorithm": {"name": "maml", "inner_lr": 0.1,
                           "policy_gradient": {"episodes_per_task": 2, "hidden": [16], "outer_epochs": 1}},
             "task_family": {"name": "nav2d", "horizon": 20}, "meta_batch_size": 2, "iterations": 2,
             "log_every": 1, "evaluation": {"tasks": 4, "inner_steps": [1]}},
    "maml_halfcheetah_vel": {
        "algorithm": {"name": "maml", "inner_lr": 0.1,
                      "policy_gradient": {"episodes_per_task": 2, "hidden": [16], "outer_epochs": 1}},
        "task_family": {"name": "halfcheetah_vel", "horizon": 10}, "meta_batch_size": 2,
        "iterations": 2, "log_every": 1, "evaluation": {"tasks": 2, "inner_steps": [1]}},
    "rl2": {"algorithm": {"name": "rl2", "hidden_size": 8, "envs_per_runner": 2, "num_epochs": 1,
                          "minibatch_trials": 4, "evaluation_trials": 10},
            "task_family": {"name": "bandit", "arms": 3, "pulls": 5}, "meta_batch_size": 4,
            "iterations": 2, "log_every": 1},
    "pearl": {"algorithm": {"name": "pearl", "hidden": 16, "train_tasks": 4, "tasks_per_iteration": 2,
                            "gradient_steps": 2, "batch_size": 8, "context_size": 4,
                            "evaluation_tasks": 3},
              "task_family": {"name": "nav2d", "horizon": 20}, "meta_batch_size": 2, "iterations": 2,
              "log_every": 1},
}
TRAIN_METRIC = {"maml": "train/return_after", "maml_halfcheetah_vel": "train/return_after",
                "rl2": "train/env_steps", "pearl": "train/critic_loss"}
FINAL_METRIC = {"maml": "test/return_step1", "maml_halfcheetah_vel": "test/return_step1",
                "rl2": "test/rl2_trial_return", "pearl": "test/adapted_return"}


def test_every_rl_algorithm_runs_through_the_service_and_a_mismatch_is_a_422(tmp_path: Path):
    server = ServerProcess(tmp_path).start()
    try:
        with server.client() as client:
            rejected = client.post("/v1/jobs", json={"algorithm": {"name": "rl2"},
                                                     "task_family": {"name": "sine"}})
            assert rejected.status_code == 422
            assert [(d["field"], d["message"]) for d in rejected.json()["error"]["details"]] == [
                ("task_family", "Value error, algorithm 'rl2' needs an RL task family "
                                "(bandit, halfcheetah_vel, nav2d, tabular_mdp), got 'sine'")]
            assert client.get("/v1/jobs").json()["data"] == []
            ids = {name: client.post("/v1/jobs", json=spec).json()["id"]
                   for name, spec in SHORT_JOBS.items()}
            deadline = time.monotonic() + 600
            jobs = {}
            while time.monotonic() < deadline:
                jobs = {name: client.get(f"/v1/jobs/{job_id}").json() for name, job_id in ids.items()}
                if all(job["status"] in {"succeeded", "failed"} for job in jobs.values()):
                    break
                time.sleep(1)
            assert {name: job["status"] for name, job in jobs.items()} == dict.fromkeys(
                SHORT_JOBS, "succeeded"), jobs
            for name, job_id in ids.items():
                steps = [m["step"] for m in client.get(
                    f"/v1/jobs/{job_id}/metrics", params={"name": TRAIN_METRIC[name]}).json()["data"]]
                assert steps == [1, 2], name
                final = client.get(f"/v1/jobs/{job_id}/metrics",
                                   params={"name": FINAL_METRIC[name]}).json()["data"]
                assert [m["step"] for m in final] == [2], name
                listed = {a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
                assert {"meta_policy.safetensors", "meta_policy.json", "checkpoint.safetensors",
                        "checkpoint.json"} <= listed, name
                directory = tmp_path / "download" / name
                directory.mkdir(parents=True)
                for artifact in ("meta_policy.safetensors", "meta_policy.json"):
                    response = client.get(f"/v1/jobs/{job_id}/artifacts/{artifact}")
                    assert response.status_code == 200
                    (directory / artifact).write_bytes(response.content)
                policy = load_meta_policy(directory)
                results = policy.evaluate(policy.sample_tasks(3, seed=1))
                assert results and all(value == value for value in results.values()), (name, results)
    finally:
        server.terminate()

