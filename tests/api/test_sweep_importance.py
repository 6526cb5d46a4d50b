"""GET /v1/sweeps/{id}/importance (api/routes/sweep_analysis.py): on synthetic trials where one
parameter decides the metric, it is ranked first with most of the variance and the others
score about nothing; a sweep with too few finished trials says so; another user's is 404."""

from __future__ import annotations

import numpy as np

from metaserve.api.routes.sweep_analysis import first_order_importance
from metaserve.service import job_store
from metaserve.service.ids import new_id
from metaserve.service.orm import Job, utcnow

SPACE = {"algorithm.inner_lr": {"loguniform": [0.001, 1.0]},
         "outer_optimizer.lr": {"loguniform": [0.0001, 0.01]},
         "algorithm.first_order": {"choice": [True, False]}}
SWEEP = {"name": "importance", "spec": {"algorithm": {"name": "maml"},
                                        "task_family": {"name": "sine"}, "iterations": 20},
         "space": SPACE, "search": {"name": "random", "seed": 0},
         "scheduler": {"name": "fifo", "metric": "val/loss_step1", "mode": "min"},
         "num_samples": 40}


def synthetic_trials(n: int, seed: int) -> tuple[list[dict], list[float]]:
    """The loss depends on log(inner_lr) only (a bowl at 0.03), plus a little noise."""
    rng = np.random.default_rng(seed)
    configs, values = [], []
    for _ in range(n):
        config = {"algorithm.inner_lr": float(10 ** rng.uniform(-3, 0)),
                  "outer_optimizer.lr": float(10 ** rng.uniform(-4, -2)),
                  "algorithm.first_order": bool(rng.integers(2))}
        configs.append(config)
        values.append((np.log10(config["algorithm.inner_lr"]) + 1.5) ** 2
                      + 0.05 * float(rng.normal()))
    return configs, values


def test_the_parameter_that_decides_the_metric_is_ranked_first_and_the_others_near_zero():
    for seed in range(5):
        configs, values = synthetic_trials(60, seed)
        result = first_order_importance(configs, values, list(SPACE))
        by_path = {row["path"]: row for row in result}
        assert result[0]["path"] == "algorithm.inner_lr", (seed, result)
        assert by_path["algorithm.inner_lr"]["importance"] > 0.7
        assert by_path["outer_optimizer.lr"]["importance"] < 0.15
        assert by_path["algorithm.first_order"]["importance"] < 0.15
        assert by_path["algorithm.first_order"]["spearman"] is None  # categorical
        assert by_path["algorithm.inner_lr"]["groups"] == 7  # floor(sqrt(60)) bins


def test_a_monotone_parameter_has_the_sign_of_its_rank_correlation():
    configs = [{"a": float(x), "b": float(x % 3)} for x in range(1, 21)]
    result = {r["path"]: r for r in first_order_importance(configs, [-x for x in range(1, 21)],
                                                           ["a", "b"])}
    assert result["a"]["spearman"] == -1.0 and result["a"]["importance"] > 0.8
    constant = first_order_importance([{"c": 1.0}] * 6, [1, 2, 3, 4, 5, 6], ["c"])
    assert constant == [{"path": "c", "importance": None, "spearman": None, "groups": 1}]


def add_trials(sessions, owner_id: str, sweep_id: str, configs: list[dict],  # noqa: ANN001
               values: list[float], status: str = "succeeded") -> None:
    with sessions() as session:
        now = utcnow()
        for config, value in zip(configs, values, strict=True):
            spec = {"algorithm": {"name": "maml",
                                  "inner_lr": config["algorithm.inner_lr"],
                                  "first_order": config["algorithm.first_order"]},
                    "outer_optimizer": {"lr": config["outer_optimizer.lr"]},
                    "task_family": {"name": "sine"}, "iterations": 20}
            job_id = new_id()
            session.add(Job(id=job_id, owner_id=owner_id, name=f"importance/{job_id[-6:]}", spec=spec,
                            spec_hash=job_store.spec_hash(spec), status=status, attempt=1,
                            max_attempts=1, progress={}, created_at=now, updated_at=now,
                            started_at=now, finished_at=now, sweep_id=sweep_id,
                            trial_id=job_id))
            session.flush()
            job_store.add_metrics(session=session, job_id=job_id,
                                  rows=[(20, "val/loss_step1", value)])
        session.commit()


def test_the_route_ranks_the_swept_paths_of_finished_trials_and_is_owner_scoped(
        client, alice_auth, bob_auth, sessions):  # noqa: ANN001
    sweep = client.post("/v1/sweeps", json=SWEEP, headers=alice_auth)
    assert sweep.status_code == 201, sweep.text
    sweep_id = sweep.json()["id"]
    with sessions() as session:
        alice_id = session.get(Job, sweep.json()["driver_job_id"]).owner_id
    configs, values = synthetic_trials(3, seed=1)
    add_trials(sessions, alice_id, sweep_id, configs, values)
    few = client.get(f"/v1/sweeps/{sweep_id}/importance", headers=alice_auth)
    assert few.status_code == 200, few.text
    assert few.json()["trials_used"] == 3
    assert few.json()["note"] == "3 finished trial(s) with a value of val/loss_step1; an estimate needs 4"
    assert {p["importance"] for p in few.json()["parameters"]} == {None}

    configs, values = synthetic_trials(40, seed=2)
    add_trials(sessions, alice_id, sweep_id, configs, values)
    running, _ = synthetic_trials(5, seed=3)  # running trials do not count
    add_trials(sessions, alice_id, sweep_id, running, [100.0] * 5, status="running")
    body = client.get(f"/v1/sweeps/{sweep_id}/importance", headers=alice_auth).json()
    assert (body["metric"], body["mode"], body["trials_used"], body["note"]) == (
        "val/loss_step1", "min", 43, None)
    assert [p["path"] for p in body["parameters"]][0] == "algorithm.inner_lr"
    assert body["parameters"][0]["importance"] > 0.7
    assert sorted(p["path"] for p in body["parameters"]) == sorted(SPACE)
    assert client.get(f"/v1/sweeps/{sweep_id}/importance", headers=bob_auth).status_code == 404


def test_a_grid_path_is_grouped_by_its_values():
    """Six trials of a 3 x 2 grid: inner_lr's three values are three groups (not two bins)."""
    configs = [{"lr": lr, "batch": batch} for lr in (0.001, 0.01, 0.1) for batch in (4, 8)]
    values = [1.0 / (1 + 100 * c["lr"]) + 0.001 * c["batch"] for c in configs]
    result = {r["path"]: r for r in first_order_importance(configs, values, ["lr", "batch"])}
    assert result["lr"]["groups"] == 3 and result["lr"]["importance"] > 0.8  # (16 - 1) / 17.5
    assert result["batch"]["groups"] == 2 and result["batch"]["importance"] == 0.0
