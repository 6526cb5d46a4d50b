"""Meta-RL jobs through the one job contract, end to end on the real ``metaserve serve``:

- an RL² bandit job and a MAML-RL nav2d job submitted over REST run to success, their progress
  carries env steps/s and the latest return, ``metaserve fetch`` downloads the meta-policy,
  ``Client.load_meta_policy`` loads it and acts on held-out tasks: RL²'s return beats random
  play, MAML-RL's return after its policy-gradient step beats the return before (paired over
  held-out tasks, t > 4); ``POST /adapt`` answers them with a 409 saying what to use instead;
- a SIGKILLed server resumes a MAML-RL job from its checkpoint with the same final bits.

The sizes are small enough for seconds of training and were measured (3 seeds each) to clear
the bars by a wide margin: RL² greedy trial return 5.6-5.8 against random's 5.0 (p <= 1e-9 on
400 tasks; the test plays 1,000); MAML-RL after its step −4.0 against −7.5 before (t > 8 on 40
tasks). docs/notes/rl-contract.md has the measurements. On nav2d one
policy-gradient step from the initial policy already helps (the test shows the contract, not
the quality of meta-training: docs/BENCHMARKS.md has that).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load

from metaserve.client import Client, Conflict, Event
from metaserve.workers.rl.maml_rl import MAMLRL
from metaserve.workers.spec import JobSpec
from tests.server_process import ServerProcess, metaserve_executable

pytestmark = pytest.mark.slow

RL2_SPEC = {"name": "rl2-bandit-small",
            "algorithm": {"name": "rl2", "hidden_size": 16, "lr": 0.02, "num_epochs": 4,
                          "minibatch_trials": 16, "envs_per_runner": 256, "evaluation_trials": 100},
            "task_family": {"name": "bandit", "arms": 2, "pulls": 10}, "meta_batch_size": 256,
            "iterations": 15, "log_every": 5, "checkpoint_every": 5, "evaluation": {"every": 0}}
MAML_SPEC = {"name": "maml-nav2d-small",
             "algorithm": {"name": "maml", "inner_lr": 0.5, "inner_steps": 1,
                           "policy_gradient": {"episodes_per_task": 10, "hidden": [32, 32],
                                               "normalize_actions": True, "outer": "ppo",
                                               "outer_epochs": 2}},
             "task_family": {"name": "nav2d", "horizon": 20}, "meta_batch_size": 10, "iterations": 5,
             "log_every": 1, "checkpoint_every": 5, "evaluation": {"every": 0, "tasks": 10, "inner_steps": [1]}}
HELD_OUT_SEED = 2024


def paired_t(differences: np.ndarray) -> float:
    return float(differences.mean() / (differences.std(ddof=1) / np.sqrt(len(differences))))


def fetch(server: ServerProcess, job_id: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "METASERVE_URL": server.url, "METASERVE_API_KEY": server.admin_key,
           "METASERVE_CONFIG": str(out.parent / "no-config.toml")}
    return subprocess.run([metaserve_executable(), "fetch", job_id, "-o", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_rl2_bandit_and_maml_nav2d_jobs_through_rest_fetch_load_and_act(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    events: dict[str, list[Event]] = {"rl2": [], "maml": []}
    try:
        with Client(url=server.url, api_key=server.admin_key) as client:
            jobs = {"rl2": client.submit(RL2_SPEC), "maml": client.submit(MAML_SPEC)}
            final = {name: client.wait(job, progress=False, on_event=events[name].append)
                     for name, job in jobs.items()}
            assert {name: job["status"] for name, job in final.items()} == {
                "rl2": "succeeded", "maml": "succeeded"}, final
            fetched = {name: fetch(server, job["id"], tmp_path / "fetched" / name)
                       for name, job in jobs.items()}
            kinds = {name: client.artifact_kind(job) for name, job in jobs.items()}
            policies = {name: client.load_meta_policy(job, cache_dir=tmp_path / "cache" / name)
                        for name, job in jobs.items()}
            with pytest.raises(Conflict) as refused:
                client.adapt_remote(jobs["maml"], support_x=[[0.0]], support_y=[[0.0]], query_x=[[0.0]])
    finally:
        server.terminate()

    for name, job in jobs.items():
        progress = [event.data for event in events[name] if event.kind == "progress"]
        assert progress and progress[-1]["iteration"] == job["spec"]["iterations"], name
        assert progress[-1]["env_steps_per_s"] > 0 and progress[-1]["env_steps"] > 0, progress[-1]
        assert isinstance(progress[-1]["latest_return"], float), progress[-1]
        out = tmp_path / "fetched" / name
        assert fetched[name].returncode == 0, fetched[name].stderr
        assert fetched[name].stdout == (
            f"downloaded meta_policy.json, meta_policy.safetensors to {out}; load it with "
            f"Client().load_meta_policy({str(out)!r})\n")
        assert json.loads((out / "meta_policy.json").read_text())["kind"] == kinds[name] == "meta_policy"
        with Client(url="http://127.0.0.1:9", api_key="ms_unused") as offline:  # no request made
            assert offline.load_meta_policy(out).recipe == policies[name].recipe
    assert refused.value.code == "not_adaptable" and "load_meta_policy" in refused.value.message

    # RL² on held-out bandits, acting greedily through act(): its trial return beats random
    # play, whose expected return on a task is pulls × the mean of its arms' means.
    rl2 = policies["rl2"]
    tasks = rl2.sample_tasks(1000, seed=HELD_OUT_SEED)
    played = np.array([rl2.episode_return(task, rl2.adapt(task), seed=index, deterministic=True)
                       for index, task in enumerate(tasks)])
    random_play = np.array([10 * task["means"].mean() for task in tasks])
    print(f"RL² trial return {played.mean():.2f}, random {random_play.mean():.2f}, "
          f"t = {paired_t(played - random_play):.1f}")
    assert played.mean() > random_play.mean() + 0.2 and paired_t(played - random_play) > 4

    # MAML-RL on held-out goals: the return after its policy-gradient step beats before.
    maml = policies["maml"]
    tasks = maml.sample_tasks(40, seed=HELD_OUT_SEED)
    before = np.array([maml.episode_return(task, seed=index, deterministic=True)
                       for index, task in enumerate(tasks)])
    after = np.array([maml.episode_return(task, maml.adapt(task, seed=index), seed=index, deterministic=True)
                      for index, task in enumerate(tasks)])
    print(f"MAML-RL return before {before.mean():.2f}, after one step {after.mean():.2f}, "
          f"t = {paired_t(after - before):.1f}")
    assert after.mean() > before.mean() and paired_t(after - before) > 4


def test_a_sigkilled_server_resumes_a_meta_rl_job_from_its_checkpoint_with_identical_bits(
        tmp_path: Path) -> None:
    spec = {**MAML_SPEC, "name": "maml-nav2d-resumed", "iterations": 60, "checkpoint_every": 5}
    server = ServerProcess(tmp_path).start()
    with server.client() as client:
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if (job["progress"] or {}).get("iteration", 0) >= 12:
                break
            time.sleep(0.05)
    assert job["status"] == "running" and job["progress"]["iteration"] < 60, job
    server.kill()

    restarted = ServerProcess(tmp_path, port=server.port).start()
    try:
        with restarted.client() as client:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in {"succeeded", "failed"}:
                    break
                time.sleep(0.25)
            assert (job["status"], job["attempt"]) == ("succeeded", 1), job  # an interruption
            steps = [m["step"] for m in client.get(
                f"/v1/jobs/{job_id}/metrics", params={"name": "train/return_after"}).json()["data"]]
            assert steps == list(range(1, 61))
            served = load(client.get(f"/v1/jobs/{job_id}/artifacts/meta_policy.safetensors").content)
    finally:
        restarted.terminate()
    # The undisturbed run: the same algorithm in this process, on one torch thread as the job's
    # actor computes (cpus_per_worker = 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        undisturbed = MAMLRL(JobSpec.model_validate(spec))
        for _ in range(60):
            undisturbed.train_iteration()
        expected, _ = undisturbed.meta_policy()
    finally:
        torch.set_num_threads(threads)
    assert sorted(served) == sorted(expected)
    for name in served:
        assert torch.equal(served[name], expected[name]), name
