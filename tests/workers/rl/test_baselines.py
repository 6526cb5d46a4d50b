"""Bandit baselines: exact on degenerate bandits, ordered as expected on random ones."""

from __future__ import annotations

import numpy as np

from metaserve.workers.rl.baselines import (UCB1_PRIOR_GRID, greedy_bayes, random_policy, thompson, tune_ucb1, ucb1,
                                           ucb1_prior)
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


def test_ucb1_with_the_prior_forces_no_pulls_and_greedy_bayes_keeps_a_winning_first_arm():
    """At n = k classic UCB1 pulls every arm once: random play. With Beta(1, 1) pseudo-counts
    (the RL² paper's code) nothing is forced: a first arm that pays keeps its lead."""
    tasks = [{"means": np.array([1.0, 0.0, 0.0])}]
    assert ucb1(tasks, pulls=3, seed=0, exploration=0.1).tolist() == [1.0]
    assert ucb1_prior(tasks, pulls=3, seed=0, exploration=0.1).tolist() == [3.0]
    assert greedy_bayes(tasks, pulls=3, seed=0).tolist() == [3.0]
    # a loser is left for the untried arms (posterior mean 1/3 < 1/2), then the winner is kept
    assert greedy_bayes([{"means": np.array([0.0, 0.0, 1.0])}], pulls=10, seed=0).tolist() == [8.0]


def test_at_n_equal_k_classic_ucb1_is_random_play_and_the_fair_baselines_beat_it():
    tasks = BanditFamily(BanditSpec(arms=10, pulls=10)).sample_tasks(
        seed=0, split="test", iteration=0, task_indices=range(2000))
    classic = ucb1(tasks, 10, seed=0)
    assert abs(classic.mean() - np.mean([t["means"].sum() for t in tasks])) < 0.15  # each arm once
    assert greedy_bayes(tasks, 10, seed=0).mean() > classic.mean() + 1.0
    tuned = tune_ucb1(tasks[:500], 10, seed=1, prior_pulls=2)
    assert tuned in UCB1_PRIOR_GRID
    assert ucb1_prior(tasks, 10, seed=0, exploration=tuned).mean() > classic.mean() + 1.0
