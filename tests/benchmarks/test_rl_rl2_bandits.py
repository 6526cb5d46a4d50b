"""The RL² benchmark's statistics: paired tests by task and the summary over seeds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from tests.benchmarks.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("rl_rl2_bandits")


def test_the_paired_test_is_a_one_sample_test_of_the_per_task_differences(bench):
    rng = np.random.default_rng(0)
    shared = rng.normal(size=5000)  # task difficulty both policies share
    rl2, baseline = shared + rng.normal(0.0, 0.1, 5000), shared + 0.01 + rng.normal(0.0, 0.1, 5000)
    test = bench.paired_test(rl2 - baseline)
    reference = stats.ttest_rel(rl2, baseline)
    assert test["difference"] == pytest.approx((rl2 - baseline).mean())
    assert test["z"] == pytest.approx(reference.statistic)
    assert test["p_two_sided"] == pytest.approx(reference.pvalue, rel=0.05)  # normal vs t, n = 5000
    # unpaired, the shared difficulty (σ 1) hides a difference of 0.01 that the pairing shows
    assert test["p_two_sided"] < 1e-4 < 0.05 < stats.ttest_ind(rl2, baseline).pvalue


def test_the_summary_over_seeds_picks_the_strongest_baseline_and_a_t_interval(bench, tmp_path):
    rng = np.random.default_rng(1)
    files = []
    for seed in range(5):
        totals = {"rl2": rng.integers(4, 9, 200), "rl2_greedy": rng.integers(4, 9, 200),
                  "random": rng.integers(2, 7, 200), "greedy_bayes": rng.integers(5, 10, 200)}
        run = {"pulls": 10, "arms": 5, "paper_rl2": 6.7, "env_steps": 1000 + seed, "train_seconds": 60.0,
               "args": {"seed": str(seed)}, "load_average": {"before": 1.0 + seed, "after": 2.0},
               "test": {"test/rl2_trial_return": float(totals["rl2"].mean()), "test/rl2_trial_return_ci95": 0.1},
               "paired_tests": bench.paired_tests({k: v.astype(float) for k, v in totals.items()}),
               "per_task_returns": {k: v.tolist() for k, v in totals.items()}}
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(run))
    bench.summarize(files, tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    means = [np.mean(json.loads(f.read_text())["per_task_returns"]["rl2"]) for f in files]
    gaps = [m - np.mean(json.loads(f.read_text())["per_task_returns"]["greedy_bayes"]) for m, f in zip(means, files)]
    assert summary["strongest_baseline"] == "greedy_bayes" and summary["seeds"] == 5
    assert summary["rl2"]["mean"] == pytest.approx(np.mean(means))
    assert summary["rl2"]["ci95"] == pytest.approx(2.776 * np.std(means, ddof=1) / math.sqrt(5), rel=1e-3)
    assert summary["vs_strongest"]["mean"] == pytest.approx(np.mean(gaps))
    assert summary["vs_strongest"]["p_two_sided"] == pytest.approx(stats.ttest_1samp(gaps, 0).pvalue)
    assert all(s["strongest_baseline"] == "greedy_bayes" for s in summary["per_seed"])
    assert summary["load_average"] == {"min": 1.0, "max": 5.0}
