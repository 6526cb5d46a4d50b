"""The server's cost limits: a job whose estimated cost (:mod:`metaserve.workers.cost`) is
above a configured cap is refused before it is stored, with a 422 that names the field, the
estimate and the cap."""

from __future__ import annotations

import logging

from metaserve.service.exceptions import CostLimitExceeded
from metaserve.service.settings import Settings
from metaserve.workers.cost import CostEstimate, estimate
from metaserve.workers.spec import JobSpec

MIB = 2**20
logger = logging.getLogger(__name__)


def _gib(size: float) -> str:
    return f"{size / 2**30:,.2f} GiB"


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


def check_job_cost(*, spec: JobSpec, settings: Settings) -> CostEstimate:
    """The job's cost estimate, or :class:`CostLimitExceeded` naming every cap it breaks."""
    cost = estimate(spec)
    problems: dict[str, str] = {}

    def refuse(field: str, text: str) -> None:
        problems[field] = f"{problems[field]}; {text}" if field in problems else text

    if cost.parameters > settings.max_parameters:
        refuse("model", f"the network has {cost.parameters:,} parameters, more than the cap of "
                        f"{settings.max_parameters:,} (METASERVE_MAX_PARAMETERS)")
    worker_cap = settings.max_worker_memory_mb * MIB
    if cost.worker_bytes > worker_cap:
        one_task_too_big = cost.worker_bytes - (cost.tasks_at_once - 1) * cost.task_memory_bytes > worker_cap
        refuse("task_family" if one_task_too_big else "meta_batch_size",
               f"an inner-loop worker would need about {_gib(cost.worker_bytes)} "
               f"({cost.tasks_at_once} task(s) at once × {_gib(cost.task_memory_bytes)}, one task's "
               f"inputs {_gib(cost.task_bytes)}), more than the cap of {_gib(worker_cap)} "
               "(METASERVE_MAX_WORKER_MEMORY_MB)"
               + ("" if one_task_too_big else
                  "; set resources.task_chunk, add workers or lower meta_batch_size"))
    job_cap = settings.max_job_memory_mb * MIB
    if cost.job_bytes > job_cap:
        refuse("resources.workers",
               f"the job would hold about {_gib(cost.job_bytes)} ({spec.resources.workers} "
               f"worker(s) × {_gib(cost.worker_bytes)} + the driver's {_gib(cost.driver_bytes)}), "
               f"more than the cap of {_gib(job_cap)} (METASERVE_MAX_JOB_MEMORY_MB)")
    if cost.meta_tasks > settings.max_meta_tasks:
        refuse("iterations", f"iterations × meta_batch_size = {cost.meta_tasks:,} tasks, more than "
                             f"the cap of {settings.max_meta_tasks:,} (METASERVE_MAX_META_TASKS)")
    if cost.work_flop > settings.max_job_pflop * 1e15:
        refuse("iterations", f"about {cost.work_flop / 1e15:,.1f} PFLOP of training, more than the "
                             f"cap of {settings.max_job_pflop:,} PFLOP (METASERVE_MAX_JOB_PFLOP)")
    if spec.max_runtime_s is not None and spec.max_runtime_s > settings.max_runtime_s:
        refuse("max_runtime_s", f"{spec.max_runtime_s:,} s is more than the cap of "
                                f"{settings.max_runtime_s:,} s (METASERVE_MAX_RUNTIME_S)")
    if problems:
        raise CostLimitExceeded(
            f"the job is larger than this server accepts: {', '.join(problems)}", **problems)
    return cost
