"""What issue #30's pages claim, held against the raw JSON they are built from: a later commit
that replaces a results file with fewer seeds, drops a baseline or the served/transductive pair,
or loses the margin over the pixel floor fails here, not in a reviewer's hands. (The pages
themselves are checked to be what docs/build.py writes from these files: test_generated_docs.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PLATEAU_FILES = ("fewshot_converged_plateau.json", "fewshot_budgets.json")  # docs/BENCHMARKS.md's table


def _document(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _plateau_runs() -> list[dict]:
    return [run for name in PLATEAU_FILES for run in _document(name)["runs"] if run["norm"] == "batch"]


def _plateau_groups() -> dict[tuple[str, str], dict]:
    return {(g["setting"], g["method"]): g for name in PLATEAU_FILES for g in _document(name)["groups"]
            if g["norm"] == "batch"}


def test_every_row_of_the_plateau_table_has_three_seeds_each_with_its_evidence() -> None:
    groups = _plateau_groups()
    assert {setting for setting, _ in groups} == {"5w1s", "5w5s", "20w1s"}
    assert {method for _, method in groups} >= {"protonet", "anil", "fomaml"}
    for key, group in groups.items():
        assert group["n"] >= 3, key
    for run in _plateau_runs():
        key = (run["setting"], run["method"], run["seed"])
        assert run["stop_reason"] in ("plateau", "max_train_seconds", "max_iterations"), key
        assert run["train_wall_seconds"] > 0 and run["hardware"] and run["engine"]["commit"], key
        assert run["curve"] and all("val_accuracy" in point for point in run["curve"]), key
        assert run["test_tasks"] >= 600 and len(run["per_task"]["served"]) == run["test_tasks"], key
        for measure in ("served", "pixel_floor", "transductive", "served_minus_floor",
                        "served_minus_transductive"):
            assert 0 < run[measure]["ci95"] < 0.05, (key, measure)  # a CI over the test tasks


def test_protonets_5w1s_served_is_at_least_25_points_above_the_pixel_floor_over_its_seeds() -> None:
    group = _plateau_groups()[("5w1s", "protonet")]
    assert group["interval"] == "t over seeds"
    assert group["served_minus_floor_mean"] - group["served_minus_floor_ci"] >= 25


def test_the_default_norm_reports_served_beside_transductive_at_the_plateau() -> None:
    for key, group in _plateau_groups().items():
        assert {"served_mean", "transductive_mean", "served_minus_transductive_mean",
                "served_minus_transductive_ci"} <= set(group), key


def test_pearl_has_five_seeds_a_control_and_a_posterior_that_carries_the_goal() -> None:
    summary = _document("rl_pearl_seeds/summary.json")
    assert summary["n"] >= 5 and len(summary["seeds"]) == summary["n"] == len(summary["files"])
    for name in summary["files"]:
        assert (RESULTS / "rl_pearl_seeds" / Path(name).name).exists(), name
    assert len(summary["return"]["after_3"]["per_seed"]) == summary["n"]
    own_minus_other = summary["own_minus_other_goal"]["after_3"]
    assert own_minus_other["mean"] - own_minus_other["ci95"] > 0 and own_minus_other["p_two_sided"] < 0.05
    probe = summary["probe_r2"]["after_3"]
    assert probe["mean"] - probe["ci95"] > 0


def test_rl2_has_five_seeds_beside_the_fair_baselines_with_paired_tests() -> None:
    summary = _document("rl_rl2_seeds/n10_k5.json")
    assert summary["seeds"] >= 5 and len(summary["per_seed"]) == summary["seeds"]
    for baseline in ("greedy_bayes", "ucb1_prior_tuned", "ucb1_tuned", "thompson", "random"):
        assert len(summary["over_seeds"][baseline]["per_seed"]) == summary["seeds"], baseline
        assert "p_two_sided" in summary["tests_over_seeds"][f"rl2 - {baseline}"], baseline
    assert summary["strongest_baseline"] == max(
        (name for name in summary["over_seeds"] if not name.startswith("rl2")),
        key=lambda name: summary["over_seeds"][name]["mean"])


@pytest.mark.parametrize("learned", ["mamlpp", "metacurvature"])
def test_each_learned_inner_optimizer_meets_maml_on_sine_and_typefaces_over_three_seeds(learned: str) -> None:
    sine = _document("learned_inner_optimizers_1000.json")["summary"]
    assert len(sine["maml"]["seeds"]) >= 3 and len(sine[learned]["seeds"]) >= 3
    typefaces = _document("fewshot_learned_optimizers.json")
    assert {g["method"]: g["n"] for g in typefaces["groups"]}.keys() >= {"maml", learned}
    assert all(g["n"] >= 3 for g in typefaces["groups"])
    comparison, = [c for c in typefaces["comparisons"]
                   if (c["first"], c["second"]) == (f"5w1s:{learned}:batch", "5w1s:maml:batch")]
    assert len(comparison["seeds"]) >= 3 and "p_two_sided" in comparison["over_seeds"]
