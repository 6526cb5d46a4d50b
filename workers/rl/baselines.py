"""Bandit baselines measured on the same tasks as RL² (Duan et al. 2016, Table 1): uniformly
random arms, UCB1 (Auer et al. 2002) with forced initial pulls and as the RL² paper's code runs
it (Beta(1, 1) pseudo-counts, no forced pulls), the greedy Bayesian policy (the arm of largest
posterior mean, the paper's "Greedy"), and Thompson sampling with Beta(1, 1) priors
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
# the RL² paper's code: c·sqrt(2 ln t / m) for c in 0, 0.1, ..., 1, i.e. exploration = c·√2
UCB1_PRIOR_GRID = tuple(round(c / 10 * UCB1_EXPLORATION, 4) for c in range(11))
PRIOR_PULLS = 2  # Beta(1, 1) as pseudo-counts: one success in two pulls per arm


def ucb1(tasks: list[Task], pulls: int, seed: int, exploration: float = UCB1_EXPLORATION,
         prior_pulls: int = 0) -> np.ndarray:
    """argmax  m_i + c · sqrt(ln t / n_i), t the pulls so far (c = √2: Auer et al.).
    ``prior_pulls`` 0: every arm is pulled once first, m_i the sample mean; ``prior_pulls``
    2 (the RL² paper's code): every arm starts with one success in two pseudo-pulls, so m_i
    is the Beta(1, 1) posterior mean, n_i counts the pseudo-pulls and nothing is forced (with
    ``exploration`` 0 this is :func:`greedy_bayes`). Ties go to the arm pulled least, then the
    lowest index (at equal posterior means the fresh arm, as the exact policy evaluation of
    benchmarks/bandit_yardsticks.py breaks them)."""
    rng = np.random.default_rng(seed)
    totals = []
    for task in tasks:
        means = task["means"]
        counts, sums = np.full(len(means), float(prior_pulls)), np.full(len(means), prior_pulls / 2)
        total = 0.0
        for t in range(pulls):
            if prior_pulls == 0 and t < len(means):
                arm = t
            else:
                scores = sums / counts + exploration * np.sqrt(np.log(max(t, 1)) / counts)
                best = np.flatnonzero(scores == scores.max())
                arm = int(best[np.argmin(counts[best])])
            reward = _pull(rng, means, arm)
            counts[arm] += 1
            sums[arm] += reward
            total += reward
        totals.append(total)
    return np.array(totals)


def ucb1_prior(tasks: list[Task], pulls: int, seed: int, exploration: float = UCB1_EXPLORATION) -> np.ndarray:
    """UCB1 as the RL² paper's code runs it: Beta(1, 1) pseudo-counts, no forced pulls."""
    return ucb1(tasks, pulls, seed, exploration=exploration, prior_pulls=PRIOR_PULLS)


def greedy_bayes(tasks: list[Task], pulls: int, seed: int) -> np.ndarray:
    """The myopic Bayesian policy: pull the arm of largest posterior mean (1 + s_i) / (2 + n_i)
    under the Beta(1, 1) prior (the RL² paper's "Greedy"); ties as :func:`ucb1`."""
    return ucb1(tasks, pulls, seed, exploration=0.0, prior_pulls=PRIOR_PULLS)


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


def tune_ucb1(tasks: list[Task], pulls: int, seed: int, prior_pulls: int = 0) -> float:
    """The exploration coefficient of :data:`UCB1_GRID` (:data:`UCB1_PRIOR_GRID` with
    ``prior_pulls``) with the best mean total reward on ``tasks`` (the RL² paper tunes UCB1's
    coefficient the same way; tune on training tasks)."""
    grid = UCB1_PRIOR_GRID if prior_pulls else UCB1_GRID
    scores = {c: ucb1(tasks, pulls, seed, exploration=c, prior_pulls=prior_pulls).mean() for c in grid}
    return max(scores, key=scores.get)


BANDIT_BASELINES = {"random": random_policy, "ucb1": ucb1, "greedy_bayes": greedy_bayes, "thompson": thompson}
