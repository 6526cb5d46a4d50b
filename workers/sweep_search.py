"""How a sweep's config becomes Ray Tune's: the search space, the searcher, the trial
scheduler, a trial's resources and where Tune keeps the experiment's state. Pure functions of
the canonical sweep (:func:`metaserve.service.sweeps.validate_sweep`); the sweep's driver
(:mod:`metaserve.workers.sweep`) runs them.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import PlacementGroupFactory

from metaserve.workers.object_store import StorageConfig, parse_s3_url
from metaserve.workers.runner import RunOptions, actor_resources, shard_ranges
from metaserve.workers.spec import JobSpec
from metaserve.workers.sweep_spec import longest_iterations

EXPERIMENTS_DIRECTORY = "_sweeps"
"""Under the artifact root: Tune's experiment state of each sweep (``_sweeps/<sweep_id>``)."""


def shuffled(config: dict[str, Any]) -> bool:
    """Whether the sweep runs its grid's points in a drawn order (``search.shuffle``)."""
    return config["search"]["name"] == "grid" and bool(config["search"].get("shuffle"))


def grid_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """A shuffled grid's trials, in order: every point of the grid ``num_samples`` times,
    permuted by ``search.seed`` (a random order without one)."""
    paths = list(config["space"])
    values = [next(iter(config["space"][path].values())) for path in paths]
    points = [dict(zip(paths, point)) for _ in range(config["num_samples"])
              for point in itertools.product(*values)]
    random.Random(config["search"]["seed"]).shuffle(points)
    return points


def tune_samples(config: dict[str, Any]) -> int:
    """Tune's ``num_samples``: a shuffled grid's points are its samples, one each."""
    return len(grid_points(config)) if shuffled(config) else config["num_samples"]


def max_iterations(config: dict[str, Any]) -> int:
    """ASHA's ``max_t``: the most iterations a trial can run (:func:`longest_iterations`)."""
    return longest_iterations(config["spec"], config["space"])


def search_space(config: dict[str, Any]) -> dict[str, Any]:
    """The sweep's domains as Tune's (a grid search takes every domain as a grid; a shuffled
    one as choices, every trial of it a point given to the searcher, :func:`grid_points`)."""
    grid = config["search"]["name"] == "grid"
    space = {}
    for path, domain in config["space"].items():
        (kind, args), = domain.items()
        if shuffled(config):
            space[path] = tune.choice(list(args))
        elif kind == "grid" or (kind == "choice" and grid):
            space[path] = tune.grid_search(list(args))
        elif kind == "choice":
            space[path] = tune.choice(list(args))
        elif kind == "uniform":
            space[path] = tune.uniform(*args)
        elif kind == "loguniform":
            space[path] = tune.loguniform(*args)
        elif kind == "randint":
            space[path] = tune.randint(*args)
        else:
            space[path] = tune.qrandint(*args)
    return space


def search_algorithm(config: dict[str, Any]):  # noqa: ANN201 - a Tune search algorithm
    from ray.tune.search import BasicVariantGenerator

    search = config["search"]
    if search["name"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=search["seed"])
    if shuffled(config):
        return BasicVariantGenerator(points_to_evaluate=grid_points(config),
                                     random_state=search["seed"])
    return BasicVariantGenerator(random_state=search["seed"])


def scheduler_of(config: dict[str, Any]):  # noqa: ANN201 - a Tune trial scheduler
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    scheduler = config["scheduler"]
    if scheduler["name"] == "asha":
        # Rungs at grace_period × η^k below max_t (Tune's _Bracket); "iteration" is the
        # meta-iteration of the evaluation window a trial reports (sweep_trial).
        return ASHAScheduler(time_attr="iteration", max_t=max_iterations(config),
                             grace_period=scheduler["grace_period"],
                             reduction_factor=scheduler["reduction_factor"])
    if scheduler["name"] == "median":
        return MedianStoppingRule(time_attr="iteration", grace_period=scheduler["grace_period"],
                                  min_samples_required=scheduler["min_samples_required"])
    return FIFOScheduler()


def trial_resources(spec: JobSpec, options: RunOptions) -> PlacementGroupFactory:
    """A trial's placement group: an empty head bundle for the trial's own process (a job's
    driver, as its supervisor, holds no CPU) and one bundle per worker actor its job starts
    (:func:`~metaserve.workers.runner.actor_resources`: the spec's CPUs and GPUs per worker),
    which Ray places in the group because Tune captures the trial's child actors."""
    actors = 1 if spec.is_rl else len(shard_ranges(spec.meta_batch_size, spec.resources.workers))
    worker = actor_resources(spec.resources, options)
    bundle = {"CPU": worker["num_cpus"], **({"GPU": worker["num_gpus"]} if "num_gpus" in worker
                                            else worker.get("resources", {}))}
    return PlacementGroupFactory([{}] + [bundle] * actors)


def experiment_location(storage: StorageConfig, sweep_id: str):  # noqa: ANN201
    """``(storage_path, filesystem, experiment path)`` of the sweep's Tune state: beside the
    artifacts, so a dispatcher on any host resumes it."""
    if not storage.is_s3:
        root = Path(storage.root).resolve() / EXPERIMENTS_DIRECTORY
        root.mkdir(parents=True, exist_ok=True)
        return str(root), None, str(root / sweep_id)
    import pyarrow.fs

    bucket, prefix = parse_s3_url(storage.root)
    filesystem = pyarrow.fs.S3FileSystem(
        access_key=storage.access_key_id or None, secret_key=storage.secret_access_key or None,
        region=storage.region, endpoint_override=storage.endpoint_url or None)
    root = "/".join(part for part in (bucket, prefix, EXPERIMENTS_DIRECTORY) if part)
    return root, filesystem, f"{root}/{sweep_id}"
