"""Sweeps: hyperparameter searches run by Ray Tune, each trial a job (docs/SWEEPS.md).

A sweep is a row in ``sweeps`` (the request as submitted, canonical) plus its *driver job*: a
plain job row, claimed, leased, heartbeated, retried and cancelled by the dispatchers exactly
like any job, whose run is the Tune driver (:mod:`metaserve.workers.sweep`) instead of the
engine (the ``sweep`` job kind, :mod:`metaserve.workers.registry`). The sweep's status,
attempts, logs and artifacts (the best trial's final artifact and ``sweep.json``) are the
driver job's. Each Tune trial is a job row with ``sweep_id`` and ``trial_id``, created through
the store (:func:`metaserve.service.job_store.start_child_job`) when Tune starts it and written by
the dispatcher from the driver's events like any job's; no dispatcher ever claims one (it is
never queued and holds no lease). A driver job that ends ends its running trials in the same
transaction (the store's terminal transitions).

Validation at submit: the base spec is a valid job; every path of the space exists in it;
every domain is well formed; every value of a discrete domain, and a continuous domain's
bounds, midpoint and a sample, give a valid job spec (each path alone, then the product of
the discrete ones); the metric is one the spec's evaluation reports; the trial count is
within the configured caps. Each failure is a 422 naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from metaserve.service import datasets, limits, job_store
from metaserve.service.exceptions import InvalidSweep, MetaserveError, SweepNotFound
from metaserve.service.ids import new_id
from metaserve.service.orm import Job, JobStatus, Metric, Sweep, User, utcnow
from metaserve.service.settings import Settings
from metaserve.workers.job_run import SweepRun, Trial
from metaserve.workers.spec import JobSpec
from metaserve.workers.sweep_spec import (DISCRETE, FORBIDDEN_PATHS, SweepError, SweepSpec,
                                          apply_config, checked_specs, costliest_configs,
                                          default_metric, forbidden_path, get_path,
                                          held_out_metric, held_out_score, longest_iterations,
                                          metric_mode, parse_domain, reported_metrics,
                                          trial_count)

SWEEP_ID_PREFIX = "sw_"


# --------------------------------------------------------------------------- validation


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")


def validate_sweep(request: SweepSpec, settings: Settings,
                   check_data: Callable[[JobSpec], JobSpec] | None = None,
                   ) -> tuple[dict[str, Any], JobSpec]:
    """The canonical sweep (every default filled in, the trial count) and its typed base spec,
    or :class:`InvalidSweep` naming the field (see the module docstring).

    ``check_data`` (at submit: :func:`metaserve.service.datasets.check_job_data`) checks the
    base spec's data and returns the spec to store, a ``tabular`` family's features resolved;
    it runs before anything else reads the spec, since the cost model needs the features (the
    input width) and every trial reads the base spec's data (the space may not change it)."""
    try:
        return _validate(request, settings, check_data)
    except SweepError as error:
        raise InvalidSweep(f"invalid sweep: {error}", **{error.field: error.message}) from None


def _validate(request: SweepSpec, settings: Settings,
              check_data: Callable[[JobSpec], JobSpec] | None) -> tuple[dict[str, Any], JobSpec]:
    try:
        base_spec = JobSpec.model_validate(request.spec)
    except ValidationError as error:
        first = error.errors()[0]
        path = ".".join(str(part) for part in first.get("loc", ()))
        raise SweepError(f"spec.{path}" if path else "spec", first.get("msg", "invalid")) from None
    if check_data is not None:
        try:
            base_spec = check_data(base_spec)
        except MetaserveError as error:  # its field, as the sweep's body names it
            error.details = {f"spec.{field}": text for field, text in error.details.items()}
            raise
    base = base_spec.model_dump(mode="json")
    domains: dict[str, tuple[str, Any]] = {}
    for path, domain in request.space.items():
        if forbidden_path(path) is not None:
            raise SweepError(f"space.{path}", f"{forbidden_path(path)} is not swept "
                             f"(none of {', '.join(FORBIDDEN_PATHS)})")
        try:
            get_path(base, path)
        except KeyError:
            raise SweepError(f"space.{path}", "no such field in the spec (with its defaults "
                             "filled in); name a field as a dotted path, e.g. "
                             "algorithm.inner_lr") from None
        domains[path] = parse_domain(path, domain)
    search = request.search.name
    if search == "grid":
        continuous = [path for path, (kind, _) in domains.items() if kind not in DISCRETE]
        if continuous:
            raise SweepError(f"space.{continuous[0]}", "a grid search takes choice or grid "
                             "domains only")
        grid = math.prod(len(args) for _, args in domains.values())
        if grid > settings.sweep_max_grid:
            raise SweepError("space", f"the grid has {grid:,} points, more than the cap of "
                             f"{settings.sweep_max_grid:,} (METASERVE_SWEEP_MAX_GRID)")
    if search == "optuna":
        gridded = [path for path, (kind, _) in domains.items() if kind == "grid"]
        if gridded:
            raise SweepError(f"space.{gridded[0]}", "optuna samples; use choice, not grid")
        _require_optuna()
    trials = trial_count(request, domains)
    if trials > settings.sweep_max_trials:
        raise SweepError("num_samples", f"the sweep would run {trials:,} trials, more than the "
                         f"cap of {settings.sweep_max_trials:,} (METASERVE_SWEEP_MAX_TRIALS)")
    scheduler = request.scheduler.model_dump(mode="json")
    metric, mode = default_metric(base_spec)
    if scheduler["metric"] is None:
        scheduler["metric"] = metric
    elif scheduler["metric"] not in reported_metrics(base_spec):
        raise SweepError("scheduler.metric", f"{scheduler['metric']!r} is not reported by the "
                         f"spec's evaluation; one of {', '.join(reported_metrics(base_spec))}")
    if scheduler["mode"] is None:
        scheduler["mode"] = metric_mode(scheduler["metric"])
    if scheduler["grace_period"] is None:
        scheduler["grace_period"] = base_spec.evaluation.every or base_spec.iterations
    if scheduler["name"] == "asha" and scheduler["grace_period"] > longest_iterations(
            base, request.space):
        raise SweepError("scheduler.grace_period", f"{scheduler['grace_period']} is longer than "
                         f"any trial ({longest_iterations(base, request.space)} iterations): "
                         "ASHA's first rung would never be reached")
    if scheduler["name"] != "fifo" and not base_spec.evaluation.every:
        raise SweepError("scheduler.name", f"{scheduler['name']} stops trials by the metric of "
                         "each evaluation window: set spec.evaluation.every")
    checked: set[str] = set()
    for config, field in checked_specs(request, base, domains):
        document = apply_config(base, config)
        try:
            trial = JobSpec.model_validate(document)
        except ValidationError as error:
            shown = ", ".join(f"{path}={value!r}" for path, value in config.items())
            raise SweepError(field, f"{shown} gives an invalid spec: {_first_error(error)}") from None
        if scheduler["metric"] not in reported_metrics(trial):
            raise SweepError(field, f"with {config} the spec no longer reports "
                             f"{scheduler['metric']}")
        key = job_store.spec_hash(document)
        if key not in checked:
            checked.add(key)
            try:
                limits.check_job_cost(spec=trial, settings=settings)
            except MetaserveError as error:
                raise SweepError(field, f"{config} gives a trial larger than this server "
                                 "accepts: " + "; ".join(
                    f"{name}: {why}" for name, why in error.details.items())) from None
    _check_costliest(base, domains, settings, trials)
    return {"name": request.name or f"sweep-{base_spec.algorithm.name}-{base_spec.task_family.name}",
            "spec": base, "space": request.space, "search": request.search.model_dump(mode="json"),
            "scheduler": scheduler, "num_samples": request.num_samples,
            "max_concurrent_trials": request.max_concurrent_trials, "trials": trials}, base_spec


def _check_costliest(base: dict[str, Any], domains: dict[str, tuple[str, Any]],
                     settings: Settings, trials: int) -> None:
    """Every trial the space can give passes the per-job caps: its most expensive point does
    (:func:`metaserve.workers.sweep_spec.costliest_configs`: every range at its upper bound,
    every non-numeric choice), or :class:`InvalidSweep` naming each path it varies and the caps
    it breaks (each path alone at its bounds was checked with the probes); and the sweep's
    total, ``trials`` × that point's work, is within ``METASERVE_SWEEP_MAX_PFLOP``."""
    work = 0.0
    for config in costliest_configs(domains):
        shown = ", ".join(f"{path}={value!r}" for path, value in config.items())
        try:
            trial = JobSpec.model_validate(apply_config(base, config))
        except ValidationError as error:
            raise SweepError("space", f"{shown} gives an invalid spec: "
                             f"{_first_error(error)}") from None
        try:
            work = max(work, limits.check_job_cost(spec=trial, settings=settings).work_flop)
        except MetaserveError as error:
            text = (f"the trial at {shown} (the space's most expensive point) is larger than "
                    f"this server accepts: "
                    + "; ".join(f"{field}: {why}" for field, why in error.details.items()))
            blamed = _paths_to_blame(base, config, settings)
            raise InvalidSweep(f"invalid sweep: {text}",
                               **{f"space.{path}": text for path in blamed}) from None
    if trials * work > settings.sweep_max_pflop * 1e15:
        raise SweepError("num_samples", f"{trials:,} trials × up to {work / 1e15:,.1f} PFLOP each "
                         f"(the space's most expensive point) is more than the cap of "
                         f"{settings.sweep_max_pflop:,} PFLOP for a sweep "
                         "(METASERVE_SWEEP_MAX_PFLOP)")


def _paths_to_blame(base: dict[str, Any], config: dict[str, Any],
                    settings: Settings) -> list[str]:
    """The paths of a configuration over the caps that it needs to be over them: those at
    whose base value the trial passes (a learning rate is not named for a meta-batch's
    size); every varied path when none alone makes the difference."""
    varied = [path for path in config if get_path(base, path) != config[path]] or list(config)
    needed = []
    for path in varied:
        try:
            limits.check_job_cost(spec=JobSpec.model_validate(apply_config(
                base, {**config, path: get_path(base, path)})), settings=settings)
        except (MetaserveError, ValidationError):
            continue
        needed.append(path)
    return needed or varied


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SweepError("search.name", "optuna is not installed on this server; use random "
                         "or grid") from None


# --------------------------------------------------------------------------- client side


@dataclass
class SweepView:
    """A sweep as the API shows it: the row, its driver job, trial counts and the best trial."""

    sweep: Sweep
    driver: Job
    counts: dict[str, int]
    best: dict[str, Any] | None


def submit_sweep(*, session: Session, owner: User, request: SweepSpec, settings: Settings,
                 idempotency_key: str | None = None) -> tuple[SweepView, bool]:
    """Validate and store a sweep and its queued driver job; ``(view, created)``. The
    Idempotency-Key is the driver job's (the one path of every submit,
    :func:`metaserve.service.job_store.create_job`, compared by the sweep's canonical config): the
    same key and body give the same sweep (``created`` False), another body a 409."""
    # The data first (trials run the features resolved here), then the space and the cost.
    config, base = validate_sweep(request, settings, lambda spec: datasets.check_job_data(
        session=session, owner=owner, spec=spec, settings=settings))
    with session.begin():
        driver, created = job_store.create_job(
            session=session, owner=owner, name=f"{config['name']} (sweep driver)",
            spec=config["spec"], spec_hash=job_store.spec_hash(config), max_attempts=base.max_attempts,
            idempotency_key=idempotency_key, max_queued=settings.max_queued_jobs_per_user,
            retry_after_s=settings.quota_retry_after_s)
        if not created:
            sweep = session.scalars(select(Sweep).where(Sweep.driver_job_id == driver.id)).one()
            return _view(session, sweep), False
        sweep = Sweep(id=SWEEP_ID_PREFIX + new_id(), owner_id=owner.id, name=config["name"],
                      config=config, config_hash=job_store.spec_hash(config), driver_job_id=driver.id,
                      created_at=utcnow())
        session.add(sweep)
        session.flush()
        return _view(session, sweep), True


def _owned(session: Session, sweep_id: str, owner: User) -> Sweep:
    query = select(Sweep).where(Sweep.id == sweep_id)
    if not owner.is_admin:
        query = query.where(Sweep.owner_id == owner.id)
    sweep = session.scalars(query).one_or_none()
    if sweep is None:
        raise SweepNotFound(sweep_id=sweep_id)
    return sweep


def get_sweep(*, session: Session, sweep_id: str, owner: User) -> SweepView:
    with session.begin():
        return _view(session, _owned(session, sweep_id, owner))


def list_sweeps(*, session: Session, owner: User, cursor: str | None = None,
                limit: int = 50) -> tuple[list[SweepView], str | None]:
    """A page of sweeps newest first and the cursor of the next page (None on the last)."""
    limit = max(1, min(limit, job_store.MAX_PAGE))
    with session.begin():
        query = select(Sweep).order_by(Sweep.id.desc()).limit(limit + 1)
        if not owner.is_admin:
            query = query.where(Sweep.owner_id == owner.id)
        if cursor:  # an empty cursor (`cursor=`) is the first page
            query = query.where(Sweep.id < SWEEP_ID_PREFIX + job_store.decode_cursor(cursor))
        rows = list(session.scalars(query))
        views = [_view(session, sweep) for sweep in rows[:limit]]
        next_cursor = (job_store.encode_cursor(rows[limit - 1].id[len(SWEEP_ID_PREFIX):])
                       if len(rows) > limit else None)
        return views, next_cursor


def cancel_sweep(*, session: Session, sweep_id: str, owner: User) -> SweepView:
    """Cancel the driver job: queued → cancelled at once; running → cancelling (its dispatcher
    kills the Tune driver, whose trial actors die with it, and marks the trials cancelled);
    a finished sweep → 409."""
    with session.begin():
        sweep = _owned(session, sweep_id, owner)
        job_store.request_cancel(session=session, job_id=sweep.driver_job_id, owner=owner)
        return _view(session, sweep)


def _view(session: Session, sweep: Sweep) -> SweepView:
    driver = session.get(Job, sweep.driver_job_id, populate_existing=True)
    assert driver is not None
    counts = dict(session.execute(select(Job.status, func.count()).where(
        Job.sweep_id == sweep.id).group_by(Job.status)).all())
    board = leaderboard(session=session, sweep=sweep)
    # The best finished trial (the one whose meta_init.* the sweep publishes); before any
    # finished, the best so far.
    valued = [row for row in board if row["value"] is not None]
    best = next((row for row in valued if row["status"] == JobStatus.SUCCEEDED.value),
                valued[0] if valued else None)
    return SweepView(sweep=sweep, driver=driver, counts=counts, best=best)


def _last_values(session: Session, sweep: Sweep, name: str) -> dict[str, tuple[int, float]]:
    """Each trial's last ``(step, value)`` of the metric ``name``, by job id."""
    last_step = (select(Metric.job_id, func.max(Metric.step).label("step"))
                 .join(Job, Job.id == Metric.job_id)
                 .where(Job.sweep_id == sweep.id, Metric.name == name)
                 .group_by(Metric.job_id).subquery())
    return {row.job_id: (row.step, row.value) for row in session.execute(
        select(Metric.job_id, Metric.step, Metric.value)
        .join(last_step, (Metric.job_id == last_step.c.job_id) & (Metric.step == last_step.c.step))
        .where(Metric.name == name))}


def leaderboard(*, session: Session, sweep: Sweep) -> list[dict[str, Any]]:
    """Every trial with its configuration and its last value of the sweep's metric (the final
    evaluation of a finished trial, the last window of a stopped one), best first; trials
    without a value last. Beside it, the trial's held-out test score (its final value of the
    metric's ``test/`` counterpart, evaluated once after its last iteration, on tasks no
    selection used) or why it has none
    (:func:`~metaserve.workers.sweep_spec.held_out_score`)."""
    metric = sweep.config["scheduler"]["metric"]
    maximize = sweep.config["scheduler"]["mode"] == "max"
    values = _last_values(session, sweep, metric)
    test_metric, _ = held_out_metric(metric)
    tests = _last_values(session, sweep, test_metric) if test_metric is not None else {}
    trials = session.scalars(select(Job).where(Job.sweep_id == sweep.id).order_by(Job.id)).all()
    rows = []
    for trial in trials:
        step, value = values.get(trial.id, (None, None))
        config = {}
        for path in sweep.config["space"]:
            try:
                config[path] = get_path(trial.spec, path)
            except KeyError:
                config[path] = None
        rows.append({"trial_id": trial.trial_id, "job_id": trial.id, "status": trial.status,
                     "message": trial.message, "config": config, "metric": metric,
                     "value": value, "step": step, "attempt": trial.attempt,
                     # Iterations trained: a trial stopped at an evaluation window ends
                     # before its progress says it reached it, its metric's step does.
                     "iteration": max((trial.progress or {}).get("iteration") or 0, step or 0)
                     or None,
                     **held_out_score(metric, trial.status, tests.get(trial.id, (None, None))[1])})

    def rank(row: dict[str, Any]) -> tuple:
        value = row["value"]
        if value is None:
            return (1, 0.0, row["job_id"])
        return (0, -value if maximize else value, row["job_id"])

    return sorted(rows, key=rank)


def sweep_trials(*, session: Session, sweep_id: str, owner: User) -> tuple[SweepView, list[dict]]:
    with session.begin():
        sweep = _owned(session, sweep_id, owner)
        view = _view(session, sweep)
        return view, leaderboard(session=session, sweep=sweep)


# --------------------------------------------------------------------------- dispatcher side


def sweep_run(*, session: Session, job_id: str, settings: Settings) -> SweepRun | None:
    """What the Tune driver of the sweep that ``job_id`` drives needs (None: ``job_id`` drives
    no sweep): the sweep, its config, the trials recorded so far (a resumed attempt keeps
    their job ids, and a finished one is reported, not rerun) and the per-job limits every
    trial's spec must pass. In the caller's transaction."""
    sweep = session.scalars(select(Sweep).where(Sweep.driver_job_id == job_id)).one_or_none()
    if sweep is None:
        return None
    trials = {row["trial_id"]: Trial(job_id=row["job_id"], status=row["status"],
                                     value=row["value"], step=row["step"],
                                     test_value=row["test_value"])
              for row in leaderboard(session=session, sweep=sweep) if row["trial_id"] is not None}
    concurrency = sweep.config.get("max_concurrent_trials")
    owner = session.get(User, sweep.owner_id)
    cap = settings.max_running_jobs_per_user
    if cap and owner is not None and not owner.is_admin:
        # Trials count toward their owner's running jobs; the driver is one of them.
        concurrency = max(1, min(concurrency or cap, cap - 1))
    return SweepRun(sweep_id=sweep.id, name=sweep.name, config=sweep.config, trials=trials,
                    max_concurrent_trials=concurrency, limits=limits.cost_limits(settings))
