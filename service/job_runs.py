"""What the supervisor of a claimed job is given (:class:`~metaserve.workers.job_run.JobRun`):
its spec, parsed once here from the job's row, the attempt, its driver's memory request and,
for a sweep's driver job, the sweep. Ray carries it to the supervisor's node as it is."""

from __future__ import annotations

from sqlalchemy.orm import Session

from metaserve.service import job_store, sweeps
from metaserve.service.orm import Job
from metaserve.service.settings import Settings
from metaserve.workers.cost import estimate
from metaserve.workers.job_run import JobRun

MIB = 2**20


def job_run(*, session: Session, job: Job, settings: Settings) -> JobRun:
    """The run of ``job``'s attempt (just claimed). Its driver asks the larger of
    ``METASERVE_DRIVER_MEMORY_MB`` and the cost model's estimate; a sweep's Tune driver at
    least ``METASERVE_SWEEP_DRIVER_MEMORY_MB``."""
    spec = job_store.job_spec(job)
    sweep = sweeps.sweep_run(session=session, job_id=job.id, settings=settings)
    memory = max(settings.driver_memory_mb * MIB, estimate(spec).driver_bytes,
                 settings.sweep_driver_memory_mb * MIB if sweep is not None else 0)
    return JobRun(job_id=job.id, spec=spec, attempt=job.attempt, memory_bytes=memory, sweep=sweep,
                  claims=job.attempt + job.interruptions)
