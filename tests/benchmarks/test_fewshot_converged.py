"""benchmarks/fewshot_converged.py: the plateau rule, and one seed end to end on a tiny budget
(train with val evaluations, stop, test served and transductive beside the pixel floor, JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fewshot_converged as converged  # noqa: E402


def test_moving_average_starts_once_the_window_is_full() -> None:
    assert converged.moving_averages([0.1, 0.2, 0.3, 0.6], 3) == pytest.approx([0.2, 11 / 30])


def test_a_rising_curve_has_not_plateaued_and_a_flat_one_has() -> None:
    rising = [0.30 + 0.01 * i for i in range(10)]  # +1 point per evaluation
    assert not converged.plateaued(rising, window=3, patience=4, min_delta=0.005)
    flat = [0.30, 0.40, 0.50, 0.55, 0.56, 0.555, 0.56, 0.558, 0.556, 0.557]
    assert converged.plateaued(flat, window=3, patience=4, min_delta=0.005)
    # the same flat tail, but too short to hold `patience` moving averages after the best one
    assert not converged.plateaued(flat[:6], window=3, patience=4, min_delta=0.005)
    # a late rise of more than min_delta restarts the count
    assert not converged.plateaued(flat + [0.60], window=3, patience=4, min_delta=0.005)


def test_one_seed_end_to_end_on_a_tiny_budget(tmp_path: Path) -> None:
    out = tmp_path / "converged.json"
    # an earlier invocation's entries: seed 1 is kept, seed 0 is replaced by this run
    earlier = {"setting": "5w1s", "method": "protonet", "norm": "batch"}
    out.write_text(json.dumps({"runs": [{**earlier, "seed": 1, "earlier": True},
                                        {**earlier, "seed": 0, "earlier": True}]}))
    converged.main(["--method", "protonet", "--setting", "5w1s", "--seeds", "0", "--meta-batch-size", "2",
                    "--eval-every", "2", "--val-tasks", "4", "--window", "2", "--patience", "1",
                    "--max-iterations", "4", "--tasks", "6", "--out", str(out)])
    runs = {r["seed"]: r for r in json.loads(out.read_text())["runs"]}
    assert not out.with_suffix(".partial.json").exists()  # the result holds the curve
    assert sorted(runs) == [0, 1] and runs[1]["earlier"] and "earlier" not in runs[0]
    run = runs[0]
    assert run["stop_reason"] in ("plateau", "max_iterations")
    assert [p["iteration"] for p in run["curve"]] == list(range(0, run["iterations"] + 1, 2))
    assert run["tested_iteration"] in [p["iteration"] for p in run["curve"]]
    assert len(run["per_task"]["served"]) == len(run["per_task"]["pixel_floor"]) == 6
    # batch norm trains transductively: both numbers, on the same test tasks
    assert len(run["per_task"]["transductive"]) == 6
    served = sum(run["per_task"]["served"]) / 6
    assert run["served"]["accuracy"] == pytest.approx(served, abs=1e-4)
    assert run["served_minus_floor"]["accuracy"] == pytest.approx(
        served - sum(run["per_task"]["pixel_floor"]) / 6, abs=1e-4)
    assert run["engine"]["commit"]
    markdown = converged.table({"runs": [run]})
    assert f"| {100 * run['served']['accuracy']:.1f} ± {100 * run['served']['ci95']:.1f} |" in markdown
    assert "seed 0 (val %" in markdown
    # the floor is benchmarks/fewshot.py's on the same test tasks (it averages in float32)
    import fewshot
    assert run["pixel_floor"]["accuracy"] == pytest.approx(fewshot.pixel_floor("5w1s", 0, 6)["accuracy"], abs=1e-6)


def test_a_budget_below_one_is_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        converged.main(["--eval-every", "0"])
    assert "--eval-every" in capsys.readouterr().err


def test_fomaml_is_mamls_spec_with_first_order_gradients(tmp_path: Path) -> None:
    out = tmp_path / "converged.json"
    converged.main(["--method", "fomaml", "--setting", "5w1s", "--seeds", "0", "--meta-batch-size", "2",
                    "--eval-every", "2", "--val-tasks", "2", "--max-iterations", "2", "--tasks", "2",
                    "--out", str(out)])
    run, = json.loads(out.read_text())["runs"]
    assert run["method"] == "fomaml"
    assert run["spec"]["algorithm"]["name"] == "maml" and run["spec"]["algorithm"]["first_order"] is True
    assert "-fomaml-" in run["spec"]["name"]


def test_several_seeds_get_the_t_interval_over_their_means_and_one_seed_its_task_ci() -> None:
    def run(seed: int, served: float, ci: float) -> dict:
        return {"setting": "5w1s", "method": "protonet", "norm": "batch", "seed": seed, "stop_reason": "plateau",
                "iterations": 100, "tested_iteration": 80, "spec": {"meta_batch_size": 2}, "train_wall_seconds": 1.0,
                "served": {"accuracy": served, "ci95": ci}}
    two, = converged.group_summaries({"runs": [run(0, 0.70, 0.01), run(1, 0.72, 0.01)]})
    assert two["n"] == 2 and two["interval"] == "t over seeds"
    assert two["served_mean"] == pytest.approx(71.0)
    assert two["served_ci"] == pytest.approx(12.706, abs=1e-3)  # t(0.975, 1) · s / √2 with s = √2
    assert (two["served_min"], two["served_max"]) == pytest.approx((70.0, 72.0))
    assert two["stopped_at"] == "100, 100" and two["tested_at"] == "80, 80"
    one, = converged.group_summaries({"runs": [run(0, 0.70, 0.01)]})
    assert one["served_ci"] == pytest.approx(1.0) and one["interval"] == "tasks"
    capped, = converged.group_summaries({"runs": [run(0, 0.70, 0.01), {**run(1, 0.72, 0.01), "iterations": 90,
                                                                      "stop_reason": "max_train_seconds"}]})
    assert capped["stopped_at"] == "100, 90†"  # the time cap marked, the plateau bare
    assert "transductive_mean" not in one  # absent in the runs: absent in the summary


def test_compare_pairs_by_task_within_a_seed_and_by_seed_over_seeds(tmp_path: Path) -> None:
    def run(norm: str, seed: int, served: list[float], floor: list[float]) -> dict:
        return {"setting": "5w1s", "method": "protonet", "norm": norm, "seed": seed, "iterations": 9,
                "served": {"accuracy": sum(served) / len(served), "ci95": 0.0},
                "per_task": {"served": served, "pixel_floor": floor}}
    floors = {seed: [0.1 * seed, 0.2, 0.3] for seed in range(3)}
    first = [run("support", s, [0.6 + 0.01 * s, 0.7, 0.8], floors[s]) for s in range(3)]
    second = [run("batch", s, [0.5, 0.7, 0.7 + 0.02 * s], floors[s]) for s in range(3)]
    (tmp_path / "a.json").write_text(json.dumps({"runs": first}))
    (tmp_path / "b.json").write_text(json.dumps({"runs": second + [run("batch", 7, [0.5], [0.1])]}))
    out = tmp_path / "comparisons.json"
    result = converged.main(["--compare", "5w1s:protonet:support", "5w1s:protonet:batch", "--inputs",
                             str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)])
    assert result["seeds"] == [0, 1, 2]  # seed 7 has no partner
    differences = [100 * (sum(a["per_task"]["served"]) - sum(b["per_task"]["served"])) / 3
                   for a, b in zip(first, second)]
    assert [s["difference"] for s in result["per_seed"]] == pytest.approx(differences)
    assert result["over_seeds"]["mean"] == pytest.approx(sum(differences) / 3)
    assert json.loads(out.read_text())["comparisons"] == [result]
    second[1]["per_task"]["pixel_floor"] = [0.9, 0.9, 0.9]  # other tasks: no pairing
    (tmp_path / "b.json").write_text(json.dumps({"runs": second}))
    with pytest.raises(SystemExit, match="different tasks"):
        converged.compare("5w1s:protonet:support", "5w1s:protonet:batch",
                          [tmp_path / "a.json", tmp_path / "b.json"])
