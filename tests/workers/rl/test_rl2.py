"""RL²'s RLlib plumbing without training: the env creator, the schedules, and the learner
connector piece that standardizes advantages over real (unpadded) steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from metaserve.workers.rl.rl2 import (ENV_STREAMS_PER_RUNNER, RealStepAdvantages, _number_streams, _schedule,
                            make_trial_env)
from metaserve.workers.rl.rl2_policy import rl2_network, run_rl2_trials
from metaserve.workers.rl.tasks import BanditFamily
from metaserve.workers.rl.trials import BanditTrialVectorEnv, TrialEnv
from metaserve.workers.spec import BanditSpec

CONFIG = {"family": {"name": "bandit", "arms": 3, "pulls": 4}, "seed": 0}


def test_env_creator_builds_a_vector_env_when_rllib_asks_for_num_envs():
    assert isinstance(make_trial_env(dict(CONFIG)), TrialEnv)
    vector = make_trial_env({**CONFIG, "num_envs": 6})
    assert isinstance(vector, BanditTrialVectorEnv) and vector.num_envs == 6
    assert vector.single_observation_space.shape == (1 + 3 + 3,)


def test_each_env_runner_plays_its_own_streams():
    vector = make_trial_env({**CONFIG, "num_envs": 2})
    runner = type("Runner", (), {"worker_index": 2})()
    _number_streams(env_runner=runner, env=vector, metrics_logger=None, env_context=None)
    assert vector.streams.tolist() == [2 * ENV_STREAMS_PER_RUNNER, 2 * ENV_STREAMS_PER_RUNNER + 1]


def test_schedules_are_constant_without_a_final_value_else_linear_over_the_steps():
    assert _schedule(0.01, None, 100) == 0.01
    assert _schedule(0.01, 0.0, 100) == [[0, 0.01], [100, 0.0]]


def test_advantages_are_standardized_over_the_real_steps_only():
    advantages = torch.tensor([[1.0, 2.0, 3.0, 50.0], [3.0, 5.0, 40.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    batch = {"default_policy": {Postprocessing.ADVANTAGES: advantages, Columns.LOSS_MASK: mask}}
    out = RealStepAdvantages()(rl_module=None, batch=batch, episodes=[])
    real = out["default_policy"][Postprocessing.ADVANTAGES][mask]
    expected = np.array([1.0, 2.0, 3.0, 3.0, 5.0])
    expected = (expected - expected.mean()) / expected.std(ddof=1)
    assert np.allclose(real.numpy(), expected, atol=1e-6)


def test_greedy_trials_pull_the_most_likely_arm():
    family = BanditFamily(BanditSpec(arms=2, pulls=5))
    network = rl2_network(family, 4)
    with torch.no_grad():
        network.pi.weight.zero_()
        network.pi.bias.copy_(torch.tensor([0.0, 5.0]))
    tasks = [{"means": np.array([0.0, 1.0])}]
    assert run_rl2_trials(network, family, tasks, seed=0, greedy=True).tolist() == [5.0]
    assert run_rl2_trials(network, family, tasks, seed=0).tolist()[0] >= 3.0


def test_the_learner_state_survives_json_and_a_resumed_trainer_keeps_its_adam_moments(ray_session):
    """The job checkpoint stores the non-tensor part of the state as JSON. torch keys the
    optimizer state by parameter index; JSON turned those keys into strings, so a resumed
    trainer lost its Adam moments and its next checkpoint failed (int and str keys mixed); and its
    env-step count (which the lr and entropy schedules follow) restarted from zero."""
    import json

    from metaserve.workers.rl.rl2 import RL2Trainer
    from metaserve.workers.spec import JobSpec

    spec = JobSpec.model_validate({
        "algorithm": {"name": "rl2", "hidden_size": 8, "envs_per_runner": 4, "num_epochs": 1,
                      "minibatch_trials": 4, "evaluation_trials": 4, "lr_final": 0.0001},
        "task_family": {"name": "bandit", "arms": 3, "pulls": 5}, "meta_batch_size": 4,
        "iterations": 3})
    first = RL2Trainer(spec)
    resumed = RL2Trainer(spec)
    try:
        first.train_iteration()
        tensors, document = first.state()
        resumed.load_state(tensors, json.loads(json.dumps(document)))
        assert resumed.iteration == 1 and resumed.env_steps == first.env_steps

        def adam_state(trainer: RL2Trainer) -> dict:
            learner = trainer.algo.learner_group.get_state()["learner"]
            return next(iter(learner["optimizer"].values()))["state"]["state"]

        original, restored = adam_state(first), adam_state(resumed)
        assert sorted(restored) == sorted(original) and all(isinstance(k, int) for k in restored)
        assert all(np.array_equal(original[k]["exp_avg"], restored[k]["exp_avg"]) for k in original)
        first.train_iteration()
        resumed.train_iteration()
        # the schedules run on RLlib's lifetime env-step count, which carries on
        assert resumed.env_steps == first.env_steps == 2 * 4 * 5
        resumed.state()
    finally:
        first.close()
        resumed.close()


def test_trial_returns_are_per_task_on_the_same_tasks_and_evaluate_summarizes_them(ray_session):
    """Paired tests need every policy's return on the same task i: the baselines' arrays are
    those of the baseline functions on the evaluation tasks, in order, and ``evaluate`` is
    their mean and 95 % CI half-width."""
    from metaserve.workers.rl.baselines import greedy_bayes, thompson
    from metaserve.workers.rl.rl2 import RL2Trainer, summarize_trial_returns
    from metaserve.workers.spec import JobSpec

    spec = JobSpec.model_validate({
        "algorithm": {"name": "rl2", "hidden_size": 8, "envs_per_runner": 4, "num_epochs": 1,
                      "minibatch_trials": 4, "evaluation_trials": 40},
        "task_family": {"name": "bandit", "arms": 3, "pulls": 6}, "meta_batch_size": 4,
        "iterations": 1, "seed": 3})
    trainer = RL2Trainer(spec)
    try:
        totals, extras = trainer.trial_returns("test")
        tasks = trainer.family.sample_tasks(seed=3, split="test", iteration=0, task_indices=range(40))
        assert {len(v) for v in totals.values()} == {40}
        assert {"rl2", "rl2_greedy", "greedy_bayes", "ucb1_prior_tuned", "thompson"} <= set(totals)
        np.testing.assert_array_equal(totals["greedy_bayes"], greedy_bayes(tasks, 6, seed=3))
        np.testing.assert_array_equal(totals["thompson"], thompson(tasks, 6, seed=3))
        summary = summarize_trial_returns("test", totals)
        assert summary["test/thompson_trial_return"] == totals["thompson"].mean()
        assert summary["test/thompson_trial_return_ci95"] == pytest.approx(
            1.96 * totals["thompson"].std() / np.sqrt(40))
        evaluation = trainer.evaluate("test")
        assert evaluation == {**extras, **summary}
    finally:
        trainer.close()
