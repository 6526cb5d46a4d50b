"""Bandit baselines: exact on degenerate bandits, ordered as expected on random ones."""

from __future__ import annotations

import numpy as np

from metaserve.workers.rl.baselines import random_policy, thompson, ucb1
from metaserve.workers.rl.tasks import BanditFamily
from metaserve.workers.spec import BanditSpec


def test_ucb1_tries_every_arm_once_then_sticks_to_the_paying_arm_when_exploring_little():
    tasks = [{"means": np.array([0.0, 0.0, 1.0])}]
    assert ucb1(tasks, pulls=10, seed=0, exploration=0.1).tolist() == [8.0]
    assert ucb1(tasks, pulls=10, seed=0).tolist() == [6.0]  # c = √2 explores the losers again


def test_baselines_rank_thompson_and_ucb1_above_random_on_many_tasks():
    tasks = BanditFamily(BanditSpec(arms=5, pulls=100)).sample_tasks(
        seed=0, split="test", iteration=0, task_indices=range(300))
    random_mean = random_policy(tasks, 100, seed=0).mean()
    assert abs(random_mean - 50.0) < 2.5
    assert ucb1(tasks, 100, seed=0).mean() > random_mean + 15
    assert thompson(tasks, 100, seed=0).mean() > random_mean + 20
