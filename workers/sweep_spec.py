"""The sweep request: a base job spec, a search space over its dotted paths, the searcher and
the early-stopping scheduler. Plain data shared by the API (validation), the service (the
leaderboard) and the Tune driver (:mod:`metaserve.workers.sweep`), which maps it to Ray Tune.

Domains, written as Ray Tune's functions of the same name (bounds as Tune reads them)::

    algorithm.inner_lr:    {loguniform: [0.001, 0.1]}   # low > 0, low <= high
    outer_optimizer.lr:    {uniform: [0.0005, 0.005]}
    meta_batch_size:       {choice: [5, 10, 25]}        # sampled
    algorithm.first_order: {grid: [true, false]}        # every value, in every sample
    algorithm.inner_steps: {randint: [1, 5]}            # 1..4: high exclusive, as tune.randint
    iterations:            {qrandint: [100, 1000, 100]} # multiples of q in [low, high]
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from typing import Any, Iterator, Literal

from pydantic import Field, StrictInt, model_validator

from metaserve.workers.exceptions import SweepError
from metaserve.workers.spec import JobSpec, StrictModel

DOMAIN_TYPES = ("choice", "grid", "uniform", "loguniform", "randint", "qrandint")
DISCRETE = ("choice", "grid")
MAX_DOMAIN_VALUES = 1000
STOPPED_EARLY = "stopped early by "
"""How the message of a trial its scheduler (ASHA) stopped begins: the trial ended with a
result, not by a cancel; the API shows its ``outcome`` as ``stopped``."""
MAX_SPACE_PATHS = 32
MAX_CHECKED_SPECS = 2048
"""Most specs one submit builds and validates (the discrete product, then each path alone)."""
MAX_COSTLIEST_POINTS = 2048
"""Most candidates for a space's most expensive point one submit estimates (the product of
the non-numeric choices, :func:`costliest_configs`); a space with more is refused."""

# Paths a space may not name (nor a part of, nor a field above): what identifies or bounds
# the run rather than trains it, and the data it reads (checked once, on the base spec).
FORBIDDEN_PATHS = ("name", "max_attempts", "max_runtime_s", "resources",
                   "task_family.dataset", "task_family.path")


def forbidden_path(path: str) -> str | None:
    """The forbidden path that ``path`` names, lies under or contains; None if it may vary."""
    for forbidden in FORBIDDEN_PATHS:
        if path == forbidden or path.startswith(forbidden + ".") or forbidden.startswith(path + "."):
            return forbidden
    return None


class SearchSpec(StrictModel):
    """How configurations are drawn: ``random`` (Tune's basic variant generator: every
    ``grid`` domain expanded, the others sampled ``num_samples`` times), ``grid`` (the
    product of every domain, each of them choice or grid), ``optuna`` (TPE through Tune's
    OptunaSearch; no grid domains).

    ``shuffle`` (grid only) runs the grid's points in an order drawn from ``seed``, as Optuna's
    GridSampler does, instead of Tune's (the first domain varying fastest, so the last value of
    the last domain comes last). The points are the same; what changes is which ones start
    first, and asynchronous early stopping (ASHA) promotes a trial by comparing it with the
    trials that reached its rung before it, so in Tune's order a grid whose strong values come
    last lets the weak ones that start first run longer."""

    name: Literal["random", "grid", "optuna"] = "random"
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1,
                                   description="Seed of the sampler (None: a random one).")
    shuffle: bool = Field(False, description="grid: run the points in an order drawn from "
                                             "seed (False: Tune's order).")

    @model_validator(mode="after")
    def _shuffle_is_a_grids(self) -> "SearchSpec":
        if self.shuffle and self.name != "grid":
            raise ValueError(f"shuffle orders a grid's points; {self.name} draws its own order")
        return self


class SchedulerSpec(StrictModel):
    """Early stopping on ``metric`` (one the spec's validation reports, e.g.
    ``val/loss_step1``), reported at every evaluation window (``evaluation.every``) and at the
    end: ``fifo`` (none), ``asha`` (Li et al. 2020), ``median`` (the median stopping rule)."""

    name: Literal["fifo", "asha", "median"] = "fifo"
    metric: str | None = Field(None, max_length=200,
                               description="Default: the validation loss after the first of "
                                           "evaluation.inner_steps (accuracy for image families).")
    mode: Literal["min", "max"] | None = Field(None, description="Default: min for a loss, "
                                                                 "max for an accuracy.")
    grace_period: StrictInt | None = Field(None, ge=1, le=10_000_000,
                                           description="Iterations before a trial may be stopped "
                                                       "(default: evaluation.every).")
    reduction_factor: float = Field(3.0, gt=1.0, le=100.0, description="ASHA's η.")
    min_samples_required: StrictInt = Field(3, ge=1, le=1000,
                                            description="median: trials needed before stopping one.")


class SweepSpec(StrictModel):
    """A hyperparameter sweep (see the module docstring)."""

    name: str | None = Field(None, max_length=200)
    spec: dict[str, Any] = Field(description="A complete job spec: the base of every trial.")
    space: dict[str, dict[str, Any]] = Field(min_length=1, max_length=MAX_SPACE_PATHS,
                                             description="{dotted spec path: domain}.")
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    num_samples: StrictInt = Field(1, ge=1, le=100_000,
                                   description="random/optuna: configurations drawn; grid: "
                                               "repetitions of the grid.")
    max_concurrent_trials: StrictInt | None = Field(None, ge=1, le=1024,
                                                    description="Default: as resources allow.")


# --------------------------------------------------------------------------- paths


def get_path(document: dict[str, Any], path: str) -> Any:
    node: Any = document
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(path)
        node = node[key]
    return node


def set_path(document: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = document
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


def apply_config(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each ``{path: value}`` of ``config`` set."""
    document = copy.deepcopy(base)
    for path, value in config.items():
        set_path(document, path, value)
    return document


def trial_spec(base: dict[str, Any], config: dict[str, Any]) -> JobSpec:
    """The job spec of a trial: ``base`` (the sweep's canonical base spec) with its sampled
    ``config`` written in, validated (a sample is new input: this is its spec's one parse)."""
    return JobSpec.model_validate(apply_config(base, config))


def longest_iterations(base: dict[str, Any], space: dict[str, dict[str, Any]]) -> int:
    """The most iterations a trial can run: the base spec's or, where the space sweeps
    ``iterations``, the largest its domain gives (ASHA's ``max_t``)."""
    domain = space.get("iterations")
    if domain is None:
        return base["iterations"]
    (kind, args), = domain.items()
    if kind in DISCRETE:
        return max(args)
    if kind == "randint":  # high exclusive
        return args[1] - 1
    if kind == "qrandint":  # Tune rounds to a multiple of q: at most high rounded up
        return math.ceil(args[1] / args[2]) * args[2]
    return math.ceil(args[1])


# --------------------------------------------------------------------------- domains


def parse_domain(path: str, domain: dict[str, Any]) -> tuple[str, Any]:
    """``(type, arguments)`` of one domain, checked; raises :class:`SweepError` naming
    ``space.<path>``."""
    field = f"space.{path}"
    if not isinstance(domain, dict) or len(domain) != 1:
        raise SweepError(field, f"a domain is one of {{{': ..., '.join(DOMAIN_TYPES)}: ...}}")
    (kind, arguments), = domain.items()
    if kind not in DOMAIN_TYPES:
        raise SweepError(field, f"unknown domain {kind!r}; one of {', '.join(DOMAIN_TYPES)}")
    if kind in DISCRETE:
        if not isinstance(arguments, list) or not 1 <= len(arguments) <= MAX_DOMAIN_VALUES:
            raise SweepError(field, f"{kind} takes a list of 1 to {MAX_DOMAIN_VALUES} values")
        return kind, arguments
    count = 3 if kind == "qrandint" else 2
    shape = "[low, high, q]" if kind == "qrandint" else "[low, high]"
    if not isinstance(arguments, list) or len(arguments) != count:
        raise SweepError(field, f"{kind} takes {shape}")
    integers = kind in ("randint", "qrandint")
    for value in arguments:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                integers and not isinstance(value, int)) or not math.isfinite(value):
            raise SweepError(field, f"{kind} takes {shape} of finite "
                                    f"{'integers' if integers else 'numbers'}")
    low, high = arguments[0], arguments[1]
    if low > high or (kind == "randint" and low == high):
        raise SweepError(field, f"low {low} is above high {high}" if low > high else
                         f"randint's high is exclusive: [{low}, {high}) is empty")
    if kind == "loguniform" and low <= 0:
        raise SweepError(field, f"loguniform needs low > 0, got {low}")
    if kind == "qrandint" and arguments[2] < 1:
        raise SweepError(field, f"q must be at least 1, got {arguments[2]}")
    return kind, arguments


def probe_values(kind: str, arguments: Any, rng: random.Random) -> list[Any]:
    """Values of a domain to validate: every one of a discrete domain; a continuous one's
    bounds, midpoint and a sample."""
    if kind in DISCRETE:
        return list(arguments)
    if kind == "uniform":
        low, high = arguments
        return [low, high, (low + high) / 2, rng.uniform(low, high)]
    if kind == "loguniform":
        low, high = arguments
        return [low, high, math.sqrt(low * high), math.exp(rng.uniform(math.log(low), math.log(high)))]
    if kind == "randint":
        low, high = arguments
        return sorted({low, high - 1, rng.randrange(low, high)})
    low, high, q = arguments
    first, last = math.ceil(low / q) * q, math.floor(high / q) * q
    return sorted({first, last, q * rng.randint(first // q, last // q)}) if first <= last else [low]


def trial_count(sweep: SweepSpec, domains: dict[str, tuple[str, Any]]) -> int:
    """How many trials the sweep runs (Tune's semantics, see :class:`SearchSpec`)."""
    if sweep.search.name == "grid":
        return sweep.num_samples * math.prod(len(args) for _, args in domains.values())
    grid = math.prod(len(args) for kind, args in domains.values() if kind == "grid")
    return sweep.num_samples * grid


RL_SWEEP_METRICS = {
    "rl2": ("val/rl2_trial_return", "val/rl2_greedy_trial_return"),
    "pearl": ("val/adapted_return",),
}
"""The validation returns an RL algorithm's evaluation reports (MAML-RL's: after each
evaluation inner step, ``val/return_step{k}``)."""


def default_metric(spec: JobSpec) -> tuple[str, str]:
    """The metric and mode a sweep of ``spec`` ranks by when it names none."""
    if spec.is_rl:
        return reported_metrics(spec)[0], "max"
    step = spec.evaluation.inner_steps[0]
    if spec.is_classification:
        return f"val/accuracy_step{step}", "max"
    return f"val/loss_step{step}", "min"


def metric_mode(metric: str) -> str:
    """Whether a sweep maximizes ``metric`` (an accuracy, a return) or minimizes it (a loss)."""
    return "max" if "accuracy" in metric or "return" in metric else "min"


def held_out_metric(metric: str) -> tuple[str | None, str | None]:
    """The held-out test counterpart of a sweep's selection metric (``val/x`` → ``test/x``: the
    same evaluation on the test tasks, which every trial evaluates once, after its last
    iteration, and which no trial is selected or stopped by) and, when there is none, why."""
    if metric.startswith("val/"):
        return "test/" + metric[len("val/"):], None
    return None, (f"{metric} is not a validation (val/) metric, so it has no held-out test/ "
                  "counterpart: no test score is reported")


def held_out_score(metric: str, status: str, test_value: float | None) -> dict[str, Any]:
    """A trial's held-out score beside its value of the selection ``metric``, as the
    leaderboard and ``sweep.json`` show it: ``test_metric`` (None: the metric has none),
    ``test_value`` (the trial's final value of it) and ``test_note``, why there is no
    ``test_value`` (None when there is one)."""
    test_metric, why = held_out_metric(metric)
    if test_metric is None:
        return {"test_metric": None, "test_value": None, "test_note": why}
    if isinstance(test_value, (int, float)) and math.isfinite(test_value):
        return {"test_metric": test_metric, "test_value": float(test_value), "test_note": None}
    if status == "succeeded":
        why = f"unknown: the trial recorded no {test_metric}"
    elif status in ("queued", "running", "cancelling"):
        why = f"not yet: {test_metric} is evaluated once, after the trial's last iteration"
    else:
        why = (f"none: the trial ended before its final evaluation, the only one of "
               f"{test_metric}")
    return {"test_metric": test_metric, "test_value": None, "test_note": why}


def reported_metrics(spec: JobSpec) -> list[str]:
    """The validation metrics every evaluation window of ``spec`` reports (a sweep ranks and
    stops trials by one of them)."""
    if spec.is_rl:
        if spec.algorithm.name in RL_SWEEP_METRICS:
            return list(RL_SWEEP_METRICS[spec.algorithm.name])
        return [f"val/return_step{step}" for step in spec.evaluation.inner_steps]
    names = []
    for step in spec.evaluation.inner_steps:
        names.append(f"val/loss_step{step}")
        if spec.is_classification:
            names.append(f"val/accuracy_step{step}")
    return names


def checked_specs(sweep: SweepSpec, base: dict[str, Any],
                  domains: dict[str, tuple[str, Any]]) -> Iterator[tuple[dict[str, Any], str]]:
    """``(config, field)`` of every configuration to validate: each path's probe values alone
    (the field is that path), then the product of the discrete domains' values with the
    continuous ones at their first probe (the field is ``space``), up to
    :data:`MAX_CHECKED_SPECS`."""
    rng = random.Random(sweep.search.seed or 0)
    probes = {path: probe_values(kind, args, rng) for path, (kind, args) in domains.items()}
    seen = 0
    for path, values in probes.items():
        for value in values:
            seen += 1
            yield {path: value}, f"space.{path}"
    if len(domains) < 2:
        return
    paths = list(probes)
    axes = [probes[p] if domains[p][0] in DISCRETE else probes[p][:1] for p in paths]
    for values in itertools.islice(itertools.product(*axes), max(0, MAX_CHECKED_SPECS - seen)):
        yield dict(zip(paths, values)), "space"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def largest_values(kind: str, arguments: Any) -> list[Any]:
    """The values of a domain that can make a trial most expensive: a range's upper bound
    (randint's largest integer, qrandint's upper bound rounded to the nearest multiple of q,
    as Tune rounds its samples); a discrete domain of numbers its largest; any other discrete domain
    (booleans, names, sub-specs) every distinct value."""
    if kind == "randint":
        return [arguments[1] - 1]
    if kind == "qrandint":  # Tune rounds a sample to the nearest multiple (numpy's round)
        return [round(arguments[1] / arguments[2]) * arguments[2]]
    if kind not in DISCRETE:
        return [arguments[1]]
    if all(_is_number(value) for value in arguments):
        return [max(arguments)]
    distinct: dict[str, Any] = {}
    for value in arguments:
        distinct.setdefault(repr(value), value)
    return list(distinct.values())


def costliest_configs(domains: dict[str, tuple[str, Any]]) -> list[dict[str, Any]]:
    """The configurations among which the space's most expensive trial lies, every one to be
    checked against the per-job caps: every numeric path at its largest value (a job's cost
    grows with every size, count and step of its spec) combined with every value of every
    other path (which choice is dearer depends on the rest: a conv4 against an MLP, a
    second-order MAML, a sub-spec that a later path fills in). Raises :class:`SweepError` on
    ``space`` when those are more than :data:`MAX_COSTLIEST_POINTS`: unchecked, a trial could
    pass the caps."""
    axes = {path: largest_values(kind, args) for path, (kind, args) in domains.items()}
    points = math.prod(len(values) for values in axes.values())
    if points > MAX_COSTLIEST_POINTS:
        raise SweepError("space", f"its non-numeric choices combine into {points:,} "
                         f"configurations, more than the {MAX_COSTLIEST_POINTS:,} this server "
                         "checks against its per-job caps; split the sweep")
    paths = list(axes)
    return [dict(zip(paths, values)) for values in itertools.product(*axes.values())]
