"""Yardsticks for RL² on Bernoulli bandits (Duan et al. 2016, Table 1): the exact Bayes-optimal
value and the finite-horizon Gittins-index policy, under the prior the benchmark samples its tasks
from (every arm's mean i.i.d. U[0, 1], i.e. Beta(1, 1); ``BanditFamily.sample_task``), and a
two-sample test of RL² against each baseline from the stored results.

    .venv/bin/python benchmarks/bandit_yardsticks.py     # ~1 minute on one core

Writes ``benchmarks/results/bandit_yardsticks.json``:

- ``exact``: the expected total reward of n pulls under the prior, computed by dynamic
  programming over posterior states (no sampling error). Bayes-optimal is tractable for
  n = 10 (k = 5, 10); at n = 100 its state space (multisets of k (successes, failures)
  pairs) is far too large, and only the Gittins policy is given (by simulation).
- ``on_test_tasks``: both policies played on the same 10,000 held-out test tasks as the RL²
  run of each setting (same task seed and split; rewards drawn as ``workers/rl/baselines.py``
  draws them), mean ± 95 % CI half-width, comparable with the RL² result file's columns.
- ``fair_baselines``: the two baselines the RL² paper's table has and a handicapped UCB1 hides:
  the greedy Bayesian policy (the arm of largest Beta(1, 1) posterior mean, the paper's
  "Greedy") and UCB1 as the paper's code runs it (Beta(1, 1) pseudo-counts, so no arm is
  pulled first by force; c tuned over the paper's grid on 500 training tasks, as the RL² job
  tunes classic UCB1), both from ``workers/rl/baselines.py``: exact under the prior at n = 10
  (policy evaluation by dynamic programming) and on the RL² run's test tasks. Classic UCB1
  pulls every arm once first, so at n = k = 10 it is random play.
- ``tests``: RL² minus each baseline of the RL² result file, with a two-sided Welch z-test
  computed from the stored means and CI half-widths (n = 10,000 each). The stored results
  hold means and CIs only, not per-trial returns, so the test is unpaired; RL² and the
  baselines played the same tasks, whose shared difficulty makes the paired test (not
  possible from these files) at least as sensitive.

Finite-horizon Gittins index (Niño-Mora 2011; Kaufmann 2016): for an arm with posterior
Beta(a, b) and r pulls left, the constant reward λ per remaining pull at which retiring at once
and playing the arm (optimally, with the option to retire later) are equally good. The policy
pulls the arm of largest index. With r = 1 it is the posterior mean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# (pulls, arms, the RL² result file whose test tasks and baselines are compared)
RL2_RESULTS = ((10, 5, "rl_rl2_bandit_n10_k5.json"), (10, 10, "rl_rl2_bandit_n10_k10.json"),
               (100, 5, "rl_rl2_bandit_n100_k5_11M.json"), (100, 5, "rl_rl2_bandit_n100_k5_seed1.json"))
BISECTION_STEPS = 40


# --------------------------------------------------------------------------- Bayes-optimal


def bayes_optimal_value(pulls: int, arms: int) -> float:
    """Expected total reward of the Bayes-optimal policy over ``pulls`` pulls of ``arms`` arms
    whose means are i.i.d. U[0, 1]. The state is the multiset of the arms' (successes,
    failures); arms in the same state are interchangeable, so states are sorted tuples."""

    @lru_cache(maxsize=None)
    def value(state: tuple[tuple[int, int], ...], left: int) -> float:
        if left == 0:
            return 0.0
        best = 0.0
        for index, (wins, losses) in enumerate(state):
            if index and state[index - 1] == (wins, losses):
                continue  # the same posterior as the previous arm
            p = (wins + 1) / (wins + losses + 2)
            success = tuple(sorted(state[:index] + ((wins + 1, losses),) + state[index + 1:]))
            failure = tuple(sorted(state[:index] + ((wins, losses + 1),) + state[index + 1:]))
            best = max(best, p * (1 + value(success, left - 1)) + (1 - p) * value(failure, left - 1))
        return best

    return value(((0, 0),) * arms, pulls)


def bayes_optimal_q(pulls: int, arms: int):  # noqa: ANN201
    """``q(counts, left) -> list of Q-values per arm`` for simulation (counts: per arm (wins, losses))."""

    @lru_cache(maxsize=None)
    def value(state: tuple[tuple[int, int], ...], left: int) -> float:
        if left == 0:
            return 0.0
        return max(q_sorted(state, left))

    def q_sorted(state: tuple[tuple[int, int], ...], left: int) -> list[float]:
        result = []
        for index, (wins, losses) in enumerate(state):
            p = (wins + 1) / (wins + losses + 2)
            success = tuple(sorted(state[:index] + ((wins + 1, losses),) + state[index + 1:]))
            failure = tuple(sorted(state[:index] + ((wins, losses + 1),) + state[index + 1:]))
            result.append(p * (1 + value(success, left - 1)) + (1 - p) * value(failure, left - 1))
        return result

    def q(counts: list[tuple[int, int]], left: int) -> list[float]:
        return q_sorted(tuple(counts), left)  # q_sorted only needs the successors sorted

    return q, value


# --------------------------------------------------------------------------- Gittins


def gittins_indices(pulls: int) -> np.ndarray:
    """``index[wins, losses, left]``: the finite-horizon Gittins index of an arm with posterior
    Beta(1 + wins, 1 + losses) and ``left`` pulls to go, for wins + losses + left ≤ pulls.
    Bisection on λ, vectorized over the arm states of each ``left``: the value of playing
    from (w, l) with the option to retire is a DP over the (i, j) successes/failures to come."""
    index = np.full((pulls + 1, pulls + 1, pulls + 1), np.nan)
    for left in range(1, pulls + 1):
        starts = [(w, l) for w in range(pulls + 1) for l in range(pulls + 1) if w + l + left <= pulls]
        wins0 = np.array([w for w, _ in starts], float)[:, None]
        losses0 = np.array([l for _, l in starts], float)[:, None]
        low, high = np.zeros(len(starts)), np.ones(len(starts))
        for _ in range(BISECTION_STEPS):
            lam = (low + high) / 2
            # W at depth d (d pulls made, left - d to go), over j = failures among them
            following = play = None
            for depth in range(left - 1, -1, -1):
                failures = np.arange(depth + 1, dtype=float)[None, :]
                wins = wins0 + depth - failures
                losses = losses0 + failures
                p = (wins + 1) / (wins + losses + 2)
                to_go = left - depth
                if following is None:  # last pull: play (p) or retire (λ)
                    play = p
                else:
                    play = p * (1 + following[:, :-1]) + (1 - p) * following[:, 1:]
                if depth > 0:
                    following = np.maximum(play, lam[:, None] * to_go)
            play_first = play[:, 0]  # the first pull is forced: compared with retiring now
            better = play_first > lam * left
            low = np.where(better, lam, low)
            high = np.where(better, high, lam)
        for (w, l), value in zip(starts, (low + high) / 2):
            index[w, l, left] = value
    return index


def index_policy_value(pulls: int, arms: int, score) -> float:  # noqa: ANN001
    """Expected total reward under the prior of the policy that pulls the arm of largest
    ``score(wins, losses, left)`` (exact policy evaluation; ties go to the first arm of the
    sorted state, which is harmless between arms in equal states)."""

    @lru_cache(maxsize=None)
    def value(state: tuple[tuple[int, int], ...], left: int) -> float:
        if left == 0:
            return 0.0
        chosen = max(range(len(state)), key=lambda i: (score(*state[i], left), -i))
        wins, losses = state[chosen]
        p = (wins + 1) / (wins + losses + 2)
        success = tuple(sorted(state[:chosen] + ((wins + 1, losses),) + state[chosen + 1:]))
        failure = tuple(sorted(state[:chosen] + ((wins, losses + 1),) + state[chosen + 1:]))
        return p * (1 + value(success, left - 1)) + (1 - p) * value(failure, left - 1)

    return value(((0, 0),) * arms, pulls)


# --------------------------------------------------------------------------- on the test tasks


def test_tasks(pulls: int, arms: int, seed: int, count: int) -> list[dict]:
    return test_tasks_of_split(pulls, arms, seed, "test", count)


def play(tasks: list[dict], pulls: int, seed: int, choose) -> np.ndarray:  # noqa: ANN001
    """Total reward per task of the policy ``choose(counts, left) -> arm``; rewards drawn as
    ``workers/rl/baselines.py`` draws them (one generator seeded with ``seed``)."""
    rng = np.random.default_rng(seed)
    totals = np.zeros(len(tasks))
    for t, task in enumerate(tasks):
        means = task["means"]
        counts = [(0, 0)] * len(means)
        for step in range(pulls):
            arm = choose(counts, pulls - step)
            reward = float(rng.random() < means[arm])
            wins, losses = counts[arm]
            counts[arm] = (wins + 1, losses) if reward else (wins, losses + 1)
            totals[t] += reward
    return totals


def summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(values.mean()), 4),
            "ci95": round(float(1.96 * values.std() / math.sqrt(len(values))), 4), "n": len(values)}


def welch(mean_a: float, ci_a: float, mean_b: float, ci_b: float) -> dict[str, float]:
    """Two-sided z-test of mean_a − mean_b from 95 % CI half-widths (n = 10,000: z ≈ t)."""
    se = math.hypot(ci_a / 1.96, ci_b / 1.96)
    z = (mean_a - mean_b) / se
    return {"difference": round(mean_a - mean_b, 4), "ci95": round(1.96 * se, 4),
            "z": round(z, 2), "p_two_sided": float(f"{math.erfc(abs(z) / math.sqrt(2)):.2g}")}


def rl2_tests(result: dict) -> dict[str, dict]:
    test = result["test"]
    rl2, rl2_ci = test["test/rl2_trial_return"], test["test/rl2_trial_return_ci95"]
    tests = {}
    for name in ("random", "ucb1", "ucb1_tuned", "thompson"):
        tests[f"rl2 - {name}"] = welch(rl2, rl2_ci, test[f"test/{name}_trial_return"],
                                       test[f"test/{name}_trial_return_ci95"])
    return tests


def fair_baselines(entry: dict, tasks: list[dict], pulls: int, arms: int, seed: int) -> None:
    """Greedy Bayes and UCB1 without forced pulls (module docstring) into ``entry``: exact
    values at n ≤ 10 under ``exact``, on the test tasks under ``on_test_tasks``."""
    from metaserve.workers.rl.baselines import PRIOR_PULLS, greedy_bayes, tune_ucb1, ucb1

    training = test_tasks_of_split(pulls, arms, seed, "train", 500)
    exploration = tune_ucb1(training, pulls, seed=seed, prior_pulls=PRIOR_PULLS)
    entry["ucb1_prior_exploration"] = exploration
    entry["on_test_tasks"]["greedy_bayes"] = summary(greedy_bayes(tasks, pulls, seed=seed))
    entry["on_test_tasks"]["ucb1_prior_tuned"] = summary(
        ucb1(tasks, pulls, seed=seed, exploration=exploration, prior_pulls=PRIOR_PULLS))
    entry["on_test_tasks"]["ucb1_classic"] = summary(ucb1(tasks, pulls, seed=seed))
    if pulls <= 10:
        entry["exact"]["greedy_bayes"] = round(index_policy_value(
            pulls, arms, lambda wins, losses, left: (wins + 1) / (wins + losses + 2)), 4)
        entry["exact"]["ucb1_prior_tuned"] = round(index_policy_value(
            pulls, arms, lambda wins, losses, left: ucb1_prior_index(wins, losses, pulls - left, exploration)), 4)


def ucb1_prior_index(wins: int, losses: int, t: int, exploration: float) -> float:
    """The index of ``workers/rl/baselines.ucb1`` with Beta(1, 1) pseudo-counts."""
    pulled = wins + losses + 2
    return (wins + 1) / pulled + exploration * math.sqrt(math.log(max(t, 1)) / pulled)


def test_tasks_of_split(pulls: int, arms: int, seed: int, split: str, count: int) -> list[dict]:
    from metaserve.workers.rl.tasks import BanditFamily
    from metaserve.workers.spec import BanditSpec

    family = BanditFamily(BanditSpec(name="bandit", arms=arms, pulls=pulls))
    return family.sample_tasks(seed=seed, split=split, iteration=0, task_indices=range(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "bandit_yardsticks.json")
    parser.add_argument("--test-trials", type=int, default=10_000)
    parser.add_argument("--pulls", type=int, nargs="+", default=None,
                        help="Only the settings with these n (default: every setting).")
    args = parser.parse_args()
    output: dict = {"prior": "each arm's mean i.i.d. U[0, 1] (BanditFamily.sample_task)",
                    "command": "python benchmarks/bandit_yardsticks.py " + " ".join(sys.argv[1:]),
                    "load_average_1min_before": os.getloadavg()[0], "settings": []}
    indices: dict[int, np.ndarray] = {}
    for pulls, arms, name in RL2_RESULTS:
        if args.pulls and pulls not in args.pulls:
            continue
        result = json.loads((RESULTS / name).read_text())
        seed = int(result["spec"]["seed"])
        if pulls not in indices:
            indices[pulls] = gittins_indices(pulls)
        index = indices[pulls]
        entry: dict = {"pulls": pulls, "arms": arms, "rl2_result": f"benchmarks/results/{name}",
                       "seed": seed, "exact": {}, "on_test_tasks": {}}
        if pulls <= 10:
            entry["exact"]["bayes_optimal"] = round(bayes_optimal_value(pulls, arms), 4)
            entry["exact"]["gittins"] = round(index_policy_value(
                pulls, arms, lambda wins, losses, left: index[wins, losses, left]), 4)
        tasks = test_tasks(pulls, arms, seed, args.test_trials)

        def gittins_arm(counts, left, index=index):  # noqa: ANN001, ANN202
            scores = [index[w, l, left] for w, l in counts]
            return int(np.argmax(scores))

        entry["on_test_tasks"]["gittins"] = summary(play(tasks, pulls, seed, gittins_arm))
        if pulls <= 10:
            q, _ = bayes_optimal_q(pulls, arms)
            entry["on_test_tasks"]["bayes_optimal"] = summary(
                play(tasks, pulls, seed, lambda counts, left: int(np.argmax(q(counts, left)))))
        fair_baselines(entry, tasks, pulls, arms, seed)
        test = result["test"]
        rl2, rl2_ci = test["test/rl2_trial_return"], test["test/rl2_trial_return_ci95"]
        entry["rl2"] = {"mean": rl2, "ci95": rl2_ci}
        entry["tests"] = rl2_tests(result)
        for policy, found in entry["on_test_tasks"].items():
            entry["tests"][f"rl2 - {policy} (same tasks)"] = welch(rl2, rl2_ci, found["mean"],
                                                                   found["ci95"])
        for policy, exact in entry["exact"].items():
            entry["tests"][f"rl2 - {policy} (exact)"] = welch(rl2, rl2_ci, exact, 0.0)
        output["settings"].append(entry)
        print(json.dumps({k: entry[k] for k in ("pulls", "arms", "seed", "exact", "on_test_tasks")}),
              flush=True)
    output["load_average_1min_after"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
