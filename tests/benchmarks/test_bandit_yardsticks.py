"""The bandit yardsticks of docs/BENCHMARKS.md: exact Bayes-optimal value and the finite-horizon
Gittins index under the U[0, 1] prior, checked against values worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bandit_yardsticks as yardsticks  # noqa: E402


def test_bayes_optimal_value_of_two_pulls_of_two_arms_is_the_stay_on_a_win_rule() -> None:
    # pull an arm (1/2); after a win pull it again (2/3), after a loss the fresh arm (1/2)
    assert yardsticks.bayes_optimal_value(2, 2) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3 + 1 / 2 * 1 / 2)
    assert yardsticks.bayes_optimal_value(1, 5) == pytest.approx(0.5)


def test_bayes_optimal_values_of_the_n10_bandits_of_the_rl2_benchmark() -> None:
    assert yardsticks.bayes_optimal_value(10, 5) == pytest.approx(6.65999, abs=1e-4)
    assert yardsticks.bayes_optimal_value(10, 10) == pytest.approx(6.71395, abs=1e-4)


def test_the_gittins_index_with_one_pull_left_is_the_posterior_mean_and_grows_with_the_horizon() -> None:
    index = yardsticks.gittins_indices(6)
    assert index[0, 0, 1] == pytest.approx(1 / 2, abs=1e-9)
    assert index[2, 1, 1] == pytest.approx(3 / 5, abs=1e-9)
    # two pulls left, fresh arm: play once, then again only after a win (indifference at λ)
    lam = index[0, 0, 2]
    assert 1 / 2 + 1 / 2 * max(2 / 3, lam) + 1 / 2 * max(1 / 3, lam) == pytest.approx(2 * lam, abs=1e-9)
    assert index[0, 0, 1] < index[0, 0, 2] < index[0, 0, 3] < index[0, 0, 6]


def test_the_gittins_policy_is_bayes_optimal_at_n10_k5() -> None:
    index = yardsticks.gittins_indices(10)
    value = yardsticks.index_policy_value(10, 5, lambda wins, losses, left: index[wins, losses, left])
    assert value == pytest.approx(yardsticks.bayes_optimal_value(10, 5), abs=1e-9)


def test_the_greedy_bayesian_policy_exact_value_at_n10_k5_and_its_simulation_agree() -> None:
    """The myopic posterior-mean policy: 6.6575 at k = 5, n = 10 (above this project's RL²
    run, 6.58 in benchmarks/results/rl_rl2_bandit_n10_k5.json), exactly by policy evaluation and within the CI by playing 4,000 tasks with
    ``workers/rl/baselines.greedy_bayes``."""
    from metaserve.workers.rl.baselines import greedy_bayes

    exact = yardsticks.index_policy_value(10, 5, lambda wins, losses, left: (wins + 1) / (wins + losses + 2))
    assert exact == pytest.approx(6.6575, abs=1e-4)
    assert exact < yardsticks.bayes_optimal_value(10, 5)
    played = yardsticks.summary(greedy_bayes(yardsticks.test_tasks(10, 5, 0, 4000), 10, seed=0))
    assert abs(played["mean"] - exact) < played["ci95"]


def test_ucb1_without_forced_pulls_exact_value_matches_its_simulation_and_beats_random_at_n_equal_k() -> None:
    from metaserve.workers.rl.baselines import PRIOR_PULLS, ucb1

    exploration = 0.2828
    exact = yardsticks.index_policy_value(
        10, 10, lambda wins, losses, left: yardsticks.ucb1_prior_index(wins, losses, 10 - left, exploration))
    assert exact > 5.0 + 1.0  # classic UCB1 at n = k = 10 is random play: 5.0
    tasks = yardsticks.test_tasks(10, 10, 0, 4000)
    played = yardsticks.summary(ucb1(tasks, 10, seed=0, exploration=exploration, prior_pulls=PRIOR_PULLS))
    assert abs(played["mean"] - exact) < played["ci95"]
    classic = yardsticks.summary(ucb1(tasks, 10, seed=0))
    assert abs(classic["mean"] - 5.0) < classic["ci95"] + 0.05
