"""RL²'s RLlib plumbing without training: the env creator, the schedules, and the learner
connector piece that standardizes advantages over real (unpadded) steps."""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from workers.rl.rl2 import (ENV_STREAMS_PER_RUNNER, RealStepAdvantages, _number_streams, _schedule,
                            make_trial_env)
from workers.rl.rl2_policy import rl2_network, run_rl2_trials
from workers.rl.tasks import BanditFamily, BanditTrialVectorEnv, TrialEnv
from workers.spec import BanditSpec

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
