"""The server's cost limits: a job whose estimated cost (:mod:`metaserve.workers.cost`) is
above a configured cap is refused before it is stored, with a 422 that names the field, the
estimate and the cap."""

from __future__ import annotations

import logging

from metaserve.service.exceptions import CostLimitExceeded, PluginSpecRefused
from metaserve.service.settings import Settings
from metaserve.workers.cost import CostEstimate, CostLimits, estimate, limit_problems
from metaserve.workers.exceptions import PluginSpecInvalid
from metaserve.workers.spec import JobSpec

MIB = 2**20
logger = logging.getLogger(__name__)


def warm_up_cost_model() -> None:
    """Estimate one job's cost: the first estimate imports torch's FLOP counter and sympy
    (~800 modules, ~120 k objects). The API runs this before it freezes its start-up objects;
    imported by the first submit after the freeze, they made every full collection stop the
    event loop for 100-270 ms again."""
    try:
        estimate(JobSpec.model_validate({"algorithm": {"name": "maml"},
                                         "task_family": {"name": "sine"}}))
    except Exception:  # noqa: BLE001 - a warm-up only; the first submit would do it
        logger.exception("cost estimate warm-up failed")


def cost_limits(settings: Settings) -> CostLimits:
    """The server's per-job caps, as the engine checks them (a sweep's trials)."""
    return CostLimits(max_parameters=settings.max_parameters,
                      max_worker_memory_mb=settings.max_worker_memory_mb,
                      max_job_memory_mb=settings.max_job_memory_mb,
                      max_meta_tasks=settings.max_meta_tasks, max_job_pflop=settings.max_job_pflop,
                      max_runtime_s=settings.max_runtime_s, max_env_steps=settings.max_env_steps)


def check_job_cost(*, spec: JobSpec, settings: Settings) -> CostEstimate:
    """The job's cost estimate, or :class:`CostLimitExceeded` naming every cap it breaks
    (:func:`metaserve.workers.cost.limit_problems`)."""
    try:
        cost = estimate(spec)
    except PluginSpecInvalid as error:
        raise PluginSpecRefused(str(error), **{error.field: error.message}) from None
    problems = limit_problems(spec, cost, cost_limits(settings))
    if problems:
        raise CostLimitExceeded(
            f"the job is larger than this server accepts: {', '.join(problems)}", **problems)
    return cost
