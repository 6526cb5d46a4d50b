"""RL²'s RLlib plumbing without training: the env creator, the schedules, and the learner
connector piece that standardizes advantages over real (unpadded) steps."""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from workers.rl.rl2 import (ENV_STREAMS_PER_RUNNER, RealStepAdvantages, _number_streams, _schedule,
                            make_trial_env)
from workers.rl.tasks import BanditTrialVectorEnv, TrialEnv

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
