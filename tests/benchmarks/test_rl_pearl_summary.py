"""PEARL's summary over seeds: t-intervals of the per-seed means and paired tests over seeds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from tests.benchmarks.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("rl_pearl_nav2d")


def test_the_summary_is_over_seeds_with_paired_tests_of_own_against_another_goals_posterior(
        bench, tmp_path):
    rng = np.random.default_rng(3)
    files, own, other = [], [], []
    for seed in range(5):
        test = {}
        for k in range(4):
            test[f"test/return_episode{k}"] = float(-50 + 8 * k + rng.normal())
            test[f"test/return_episode{k}_ci95"] = 2.0
            if k:
                test[f"test/return_episode{k}_other_task"] = float(-46 + rng.normal())
                test[f"test/probe_r2_episode{k}"] = float(0.1 * k + 0.05 * rng.random())
        own.append(test["test/return_episode3"])
        other.append(test["test/return_episode3_other_task"])
        run = {"spec": {"seed": seed}, "env_steps": 100_000 + seed, "train_seconds": 500.0 + seed,
               "load_average": {"before": 1.0, "after": 2.0 + seed}, "test": test,
               "per_task_returns": [[0.0] * 200 for _ in range(4)],
               "reached_minus_15": {"after_3_episodes": {}} if seed == 4 else {}}
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(run))
    summary = bench.summarize(files, tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["n"] == 5 and summary["seeds"] == [0, 1, 2, 3, 4]
    assert summary["test_goals_per_seed"] == 200 and summary["reached_minus_15"] == 1
    assert summary["return"]["after_3"]["mean"] == pytest.approx(np.mean(own))
    assert summary["return"]["after_3"]["ci95"] == pytest.approx(
        2.776 * np.std(own, ddof=1) / math.sqrt(5), rel=1e-3)
    gap = summary["own_minus_other_goal"]["after_3"]
    assert gap["mean"] == pytest.approx(np.mean(own) - np.mean(other))
    assert gap["p_two_sided"] == pytest.approx(stats.ttest_rel(own, other).pvalue)
    assert summary["load_average"] == {"min": 1.0, "max": 6.0}
