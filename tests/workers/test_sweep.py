"""The sweep document mapped to Ray Tune (no cluster): domains, searchers, schedulers, trial
resources, trial job ids."""

from __future__ import annotations

import random

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from metaserve.workers.runner import RunOptions
import itertools

import pytest
from pydantic import ValidationError
from ray.tune.experiment import Experiment

from metaserve.workers.spec import JobSpec
from metaserve.workers.sweep import new_trial_job_id
from metaserve.workers.sweep_search import (max_iterations, scheduler_of, search_algorithm,
                                            search_space, trial_resources, tune_samples)
from metaserve.workers.sweep_spec import SweepSpec, apply_config, probe_values

SPACE = {"algorithm.inner_lr": {"loguniform": [0.001, 0.1]},
         "outer_optimizer.lr": {"uniform": [0.001, 0.01]},
         "meta_batch_size": {"choice": [5, 10]},
         "algorithm.first_order": {"grid": [True, False]},
         "algorithm.inner_steps": {"randint": [1, 4]},
         "iterations": {"qrandint": [100, 300, 100]}}


def config(search: str = "random", scheduler: str = "fifo", space: dict = SPACE) -> dict:  # noqa: B006
    return {"spec": {"iterations": 300, "resources": {"workers": 2, "cpus_per_worker": 0.5,
                                                      "gpus_per_worker": 0.25}},
            "space": space, "search": {"name": search, "seed": 3},
            "scheduler": {"name": scheduler, "metric": "val/loss_step1", "mode": "min",
                          "grace_period": 50, "reduction_factor": 3.0,
                          "min_samples_required": 3},
            "num_samples": 2}


def test_domains_map_to_tunes_and_a_grid_search_grids_every_choice():
    space = search_space(config())
    assert isinstance(space["algorithm.inner_lr"], tune.search.sample.Float)
    assert (space["algorithm.inner_lr"].lower, space["algorithm.inner_lr"].upper) == (0.001, 0.1)
    assert isinstance(space["algorithm.inner_lr"].get_sampler(), tune.search.sample.LogUniform)
    assert space["meta_batch_size"].categories == [5, 10]
    assert space["algorithm.first_order"] == {"grid_search": [True, False]}
    assert (space["algorithm.inner_steps"].lower, space["algorithm.inner_steps"].upper) == (1, 4)
    assert space["iterations"].get_sampler().q == 100
    grid = search_space(config("grid", space={"meta_batch_size": {"choice": [5, 10]}}))
    assert grid == {"meta_batch_size": {"grid_search": [5, 10]}}


def test_searchers_and_schedulers_are_tunes():
    assert isinstance(search_algorithm(config("random")), BasicVariantGenerator)
    assert isinstance(search_algorithm(config("optuna")), OptunaSearch)
    asha = scheduler_of(config(scheduler="asha"))
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("iteration", 300, 3.0)
    median = scheduler_of(config(scheduler="median"))
    assert isinstance(median, MedianStoppingRule) and median._time_attr == "iteration"
    assert isinstance(scheduler_of(config()), FIFOScheduler)


def test_asha_rungs_are_grace_times_eta_powers_below_the_longest_trial():
    # max_t: the base spec's 300 iterations, or the largest the space's iterations domain gives
    asha = scheduler_of(config(scheduler="asha", space={"meta_batch_size": {"choice": [5]}}))
    assert asha._max_t == 300
    assert sorted(milestone for milestone, _ in asha._brackets[0]._rungs) == [50, 150]
    for domain, longest in (({"grid": [200, 900]}, 900), ({"randint": [100, 701]}, 700),
                            ({"qrandint": [100, 650, 100]}, 700)):
        swept = config(scheduler="asha", space={"iterations": domain})
        assert max_iterations(swept) == longest
        assert scheduler_of(swept)._max_t == longest


GRID = {"algorithm.inner_lr": {"grid": [0.003, 0.01, 0.03, 0.1]},
        "outer_optimizer.lr": {"grid": [0.0005, 0.002]},
        "meta_batch_size": {"choice": [10, 25]}}


def trials_of(swept: dict) -> list[tuple]:
    """The configurations Tune's searcher hands out for ``swept``, in order."""
    searcher = search_algorithm(swept)
    searcher.add_configurations([Experiment("x", run=lambda _: None, config=search_space(swept),
                                            num_samples=tune_samples(swept))])
    trials = []
    while (trial := searcher.next_trial()) is not None:
        trials.append(tuple(trial.config[path] for path in GRID))
    return trials


def test_a_shuffled_grid_runs_the_same_points_in_an_order_drawn_from_its_seed():
    grid = config("grid", space=GRID)
    in_tunes_order = trials_of(grid)
    points = list(itertools.product([0.003, 0.01, 0.03, 0.1], [0.0005, 0.002], [10, 25]))
    assert sorted(in_tunes_order) == sorted(points * 2)  # num_samples 2: the grid twice
    assert in_tunes_order[:2] == [(0.003, 0.0005, 10), (0.01, 0.0005, 10)]  # first domain fastest

    def shuffled(seed: int) -> dict:
        return {**grid, "search": {"name": "grid", "seed": seed, "shuffle": True}}

    assert tune_samples(shuffled(3)) == 32
    first = trials_of(shuffled(3))
    assert sorted(first) == sorted(in_tunes_order)  # the same points, each as often
    assert first == trials_of(shuffled(3))  # repeatable
    assert first != in_tunes_order and first != trials_of(shuffled(4))


def test_only_a_grid_is_shuffled():
    base = {"spec": {}, "space": GRID}
    assert SweepSpec.model_validate({**base, "search": {"name": "grid", "shuffle": True}})
    for name in ("random", "optuna"):
        with pytest.raises(ValidationError, match="shuffle"):
            SweepSpec.model_validate({**base, "search": {"name": name, "shuffle": True}})


def test_a_trial_reserves_a_bundle_per_worker_of_its_job_and_none_for_its_driver():
    spec = JobSpec.model_validate({"algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
                                   **config()["spec"]})  # 2 workers × 0.5 CPU, 0.25 GPU
    placed = trial_resources(spec, RunOptions())
    assert (placed.head_bundle_is_empty, placed.bundles) == (True, [{"CPU": 0.5, "GPU": 0.25}] * 2)
    stand_in = trial_resources(spec, RunOptions(gpu_resource="gpu_slot"))
    assert stand_in.bundles == [{"CPU": 0.5, "gpu_slot": 0.25}] * 2
    rl = JobSpec.model_validate({"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit"},
                                 "resources": {"cpus_per_worker": 1}})
    assert trial_resources(rl, RunOptions()).bundles == [{"CPU": 1.0}]  # its one RL actor


def test_trial_job_ids_have_the_job_id_shape_and_sort_by_time():
    first = new_trial_job_id()
    later = [new_trial_job_id() for _ in range(3)]
    assert len(first) == 26 and first.isalnum() and first.upper() == first
    assert first[:8] <= min(later)[:8]


def test_probe_values_cover_bounds_and_stay_in_range_and_configs_apply_to_a_copy():
    rng = random.Random(0)
    assert probe_values("qrandint", [100, 350, 100], rng)[0] == 100
    assert max(probe_values("qrandint", [100, 350, 100], rng)) == 300
    assert probe_values("randint", [1, 4], rng)[0] == 1 and max(probe_values("randint", [1, 4], rng)) == 3
    low, high, mid, sample = probe_values("loguniform", [0.001, 0.1], rng)
    assert (low, high) == (0.001, 0.1) and abs(mid - 0.01) < 1e-12 and 0.001 <= sample <= 0.1
    base = {"algorithm": {"inner_lr": 0.01}}
    assert apply_config(base, {"algorithm.inner_lr": 0.1}) == {"algorithm": {"inner_lr": 0.1}}
    assert base == {"algorithm": {"inner_lr": 0.01}}
