"""A meta-RL job through workers.registry.run_job on the shared local Ray: schedule, checkpoints,
resume with the same bits, cancel, and the meta-policy artifact loaded and run on new tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from metaserve.workers.rl import load_meta_policy
from metaserve.workers.engine.loop import RunHooks
from metaserve.workers.exceptions import JobCancelled, Unschedulable
from metaserve.workers.runner import RunOptions, actor_resources
from metaserve.workers import registry
from metaserve.workers.spec import JobSpec


def run_job(spec: dict, *args, **kwargs) -> dict:  # noqa: ANN002, ANN003
    """:func:`metaserve.workers.registry.run_job` of a spec written here as a document (this
    file's edge: parsed once, as the API and the CLI do)."""
    return registry.run_job(JobSpec.model_validate(spec), *args, **kwargs)


SPEC = {"algorithm": {"name": "maml", "inner_lr": 0.1,
                      "policy_gradient": {"episodes_per_task": 2, "hidden": [8], "outer_epochs": 1}},
        "task_family": {"name": "nav2d", "horizon": 10}, "meta_batch_size": 2, "iterations": 4,
        "log_every": 1, "checkpoint_every": 2, "evaluation": {"every": 0, "tasks": 4, "inner_steps": [1]}}


@pytest.mark.slow
def test_an_rl_job_reports_checkpoints_and_exports_a_loadable_meta_policy(ray_session, tmp_path):
    reports, files = [], []
    run_job(SPEC, tmp_path, RunHooks(report=lambda step, m: reports.append((step, sorted(m))),
                                     checkpointed=lambda paths: files.extend(p.name for p in paths)))
    train_keys = sorted(["train/return_before", "train/return_after", "train/outer_loss",
                         "train/env_steps", "train/env_steps_per_second"])
    evaluation_keys = sorted(f"{split}/return_step{k}{suffix}" for split in ("val", "test")
                             for k in (0, 1) for suffix in ("", "_ci95"))
    assert reports == [(1, train_keys), (2, train_keys), (3, train_keys), (4, train_keys),
                       (4, evaluation_keys)]
    assert files == ["checkpoint.safetensors", "checkpoint.json"] * 2 + [
        "meta_policy.safetensors", "meta_policy.json"]
    document = json.loads((tmp_path / "meta_policy.json").read_text())
    assert document["recipe"]["algorithm"] == "maml" and document["iterations"] == 4
    assert set(load_file(tmp_path / "meta_policy.safetensors")) == {
        "layers.0.weight", "layers.0.bias", "head.weight", "head.bias", "log_std"}
    policy = load_meta_policy(tmp_path)
    results = policy.evaluate(policy.sample_tasks(5, seed=1), inner_steps=[1, 2])
    assert sorted(results) == sorted(f"return_step{k}{s}" for k in (0, 1, 2) for s in ("", "_ci95"))
    assert all(-15 < results[f"return_step{k}"] <= 0 for k in (0, 1, 2))


@pytest.mark.slow
def test_a_cancelled_rl_job_resumes_from_its_checkpoint_with_identical_bits(ray_session, tmp_path):
    run_job(SPEC, tmp_path / "undisturbed")
    checkpoints = []

    def should_stop() -> bool:
        return bool(checkpoints)

    with pytest.raises(JobCancelled):
        run_job(SPEC, tmp_path / "disturbed",
                RunHooks(checkpointed=checkpoints.append, should_stop=should_stop))
    assert json.loads((tmp_path / "disturbed" / "checkpoint" / "checkpoint.json").read_text())[
        "iteration"] == 2
    reports = []
    run_job(SPEC, tmp_path / "disturbed", RunHooks(report=lambda step, m: reports.append(step)))
    assert reports == [3, 4, 4]
    undisturbed = load_file(tmp_path / "undisturbed" / "meta_policy.safetensors")
    resumed = load_file(tmp_path / "disturbed" / "meta_policy.safetensors")
    assert all(undisturbed[name].equal(resumed[name]) for name in undisturbed)


def test_a_job_cancelled_before_its_first_iteration_writes_nothing(ray_session, tmp_path: Path):
    with pytest.raises(JobCancelled):
        run_job(SPEC, tmp_path / "job", RunHooks(should_stop=lambda: True))
    assert list((tmp_path / "job").iterdir()) == []


PEARL_SPEC = {"algorithm": {"name": "pearl", "hidden": 8, "latent_dim": 2, "train_tasks": 3,
                            "tasks_per_iteration": 2, "gradient_steps": 2, "batch_size": 4,
                            "context_size": 4, "evaluation_tasks": 2},
              "task_family": {"name": "nav2d", "horizon": 8}, "meta_batch_size": 2, "iterations": 4,
              "log_every": 1, "checkpoint_every": 2}


@pytest.mark.slow
def test_a_cancelled_pearl_job_resumes_its_networks_optimizers_and_replay_with_identical_bits(
        ray_session, tmp_path):
    run_job(PEARL_SPEC, tmp_path / "undisturbed")
    checkpoints = []
    with pytest.raises(JobCancelled):
        run_job(PEARL_SPEC, tmp_path / "disturbed",
                RunHooks(checkpointed=checkpoints.append, should_stop=lambda: bool(checkpoints)))
    progress = []
    run_job(PEARL_SPEC, tmp_path / "disturbed", RunHooks(progress=progress.append))
    assert [p["iteration"] for p in progress] == [3, 4]
    assert set(progress[-1]) == {"iteration", "total", "env_steps_per_s", "eta_s", "workers",
                                 "env_steps", "latest_return"}
    undisturbed = load_file(tmp_path / "undisturbed" / "meta_policy.safetensors")
    resumed = load_file(tmp_path / "disturbed" / "meta_policy.safetensors")
    assert sorted(undisturbed) == sorted(resumed)
    assert all(undisturbed[name].equal(resumed[name]) for name in undisturbed)


def test_an_rl_job_is_placed_by_the_servers_run_options(ray_session, tmp_path):
    spec = {**SPEC, "resources": {"gpus_per_worker": 1}}
    options = RunOptions(gpu_resource="gpu_slot")
    assert actor_resources(JobSpec.model_validate(spec).resources, options) == {
        "num_cpus": 1.0, "resources": {"gpu_slot": 1.0}}
    with pytest.raises(Unschedulable, match=r"^waiting for resources: 1 GPU\(s\) \(gpu_slot\) asked"):
        run_job(spec, tmp_path / "job", options=options)


RL2_SPEC = {"algorithm": {"name": "rl2", "hidden_size": 8, "envs_per_runner": 8, "num_epochs": 2,
                          "minibatch_trials": 4, "evaluation_trials": 10},
            "task_family": {"name": "bandit", "arms": 3, "pulls": 5}, "meta_batch_size": 8,
            "iterations": 4, "log_every": 1, "checkpoint_every": 2}


@pytest.mark.slow
def test_a_cancelled_rl2_job_resumes_with_identical_bits(ray_session, tmp_path):
    """RLlib's env runners keep state outside the checkpoint (trial counters, RNG, episodes in
    flight); every iteration starts them from (seed, iteration), so a resumed job samples and
    learns what an uninterrupted one does."""
    run_job(RL2_SPEC, tmp_path / "undisturbed")
    checkpoints = []
    with pytest.raises(JobCancelled):
        run_job(RL2_SPEC, tmp_path / "disturbed",
                RunHooks(checkpointed=checkpoints.append, should_stop=lambda: bool(checkpoints)))
    run_job(RL2_SPEC, tmp_path / "disturbed")
    undisturbed = load_file(tmp_path / "undisturbed" / "meta_policy.safetensors")
    resumed = load_file(tmp_path / "disturbed" / "meta_policy.safetensors")
    assert sorted(undisturbed) == sorted(resumed)
    assert all(undisturbed[name].equal(resumed[name]) for name in undisturbed)
