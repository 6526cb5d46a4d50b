"""Bandit baselines measured on the same tasks as RL² (Duan et al. 2016, Table 1): uniformly
random arms, UCB1 (Auer et al. 2002) and Thompson sampling with Beta(1, 1) priors
(Thompson 1933). Each returns the total reward of one trial of ``pulls`` pulls per task."""

from __future__ import annotations

import numpy as np

from metaserve.workers.rl.tasks import Task


def _pull(rng: np.random.Generator, means: np.ndarray, arm: int) -> float:
    return float(rng.random() < means[arm])


def random_policy(tasks: list[Task], pulls: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    totals = []
    for task in tasks:
        means = task["means"]
        totals.append(sum(_pull(rng, means, int(rng.integers(len(means)))) for _ in range(pulls)))
    return np.array(totals)


UCB1_EXPLORATION = 2.0 ** 0.5
UCB1_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, UCB1_EXPLORATION)


def ucb1(tasks: list[Task], pulls: int, seed: int, exploration: float = UCB1_EXPLORATION) -> np.ndarray:
    """Pull every arm once, then argmax  mean_i + c · sqrt(ln t / n_i) (c = √2: Auer et al.)."""
    rng = np.random.default_rng(seed)
    totals = []
    for task in tasks:
        means = task["means"]
        counts, sums, total = np.zeros(len(means)), np.zeros(len(means)), 0.0
        for t in range(pulls):
            if t < len(means):
                arm = t
            else:
                arm = int(np.argmax(sums / counts + exploration * np.sqrt(np.log(t) / counts)))
            reward = _pull(rng, means, arm)
            counts[arm] += 1
            sums[arm] += reward
            total += reward
        totals.append(total)
    return np.array(totals)


def thompson(tasks: list[Task], pulls: int, seed: int) -> np.ndarray:
    """Sample θ_i ~ Beta(1 + successes_i, 1 + failures_i), pull argmax θ."""
    rng = np.random.default_rng(seed)
    totals = []
    for task in tasks:
        means = task["means"]
        wins, losses, total = np.ones(len(means)), np.ones(len(means)), 0.0
        for _ in range(pulls):
            arm = int(np.argmax(rng.beta(wins, losses)))
            reward = _pull(rng, means, arm)
            wins[arm] += reward
            losses[arm] += 1 - reward
            total += reward
        totals.append(total)
    return np.array(totals)


def tune_ucb1(tasks: list[Task], pulls: int, seed: int) -> float:
    """The exploration coefficient of :data:`UCB1_GRID` with the best mean total reward on
    ``tasks`` (the RL² paper tunes UCB1's coefficient the same way; tune on training tasks)."""
    scores = {c: ucb1(tasks, pulls, seed, exploration=c).mean() for c in UCB1_GRID}
    return max(scores, key=scores.get)


BANDIT_BASELINES = {"random": random_policy, "ucb1": ucb1, "thompson": thompson}
