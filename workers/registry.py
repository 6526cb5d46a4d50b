"""Every job kind runs through one contract: this registry → one driver interface
(:class:`~metaserve.workers.engine.loop.Driver`) → :func:`~metaserve.workers.engine.loop.train_loop`'s
schedule, one checkpoint format (:mod:`~metaserve.workers.engine.checkpoints`), one artifact
writer (:mod:`~metaserve.workers.engine.final_artifact`).

==============  =======================================  ==================  =====================
kind            algorithms                               driver              artifact
==============  =======================================  ==================  =====================
meta_learning   maml, reptile, anil, metasgd, prompt     MetaLearningRay…    ``meta_init.*``
meta_rl         rl2, pearl, maml on an RL task family    RLDriver            ``meta_policy.*``
==============  =======================================  ==================  =====================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metaserve.workers.engine.loop import Driver, RunHooks, train_loop
from metaserve.workers.rl.driver import RLDriver
from metaserve.workers.runner import MetaLearningRayDriver, RunOptions
from metaserve.workers.spec import JobSpec


@dataclass(frozen=True)
class JobKind:
    """A kind of job and how to build its driver (the artifact's kind follows from the spec:
    :func:`~metaserve.workers.engine.final_artifact.artifact_kind`)."""

    name: str
    driver: Callable[[JobSpec, RunHooks, RunOptions], Driver]


JOB_KINDS: dict[str, JobKind] = {
    "meta_learning": JobKind("meta_learning", MetaLearningRayDriver),
    "meta_rl": JobKind("meta_rl", RLDriver),
}


def job_kind(spec: JobSpec) -> JobKind:
    """The kind of ``spec``'s job: meta-RL on an RL task family, else meta-learning."""
    return JOB_KINDS["meta_rl" if spec.is_rl else "meta_learning"]


def run_job(spec: JobSpec | dict, job_dir: Path, hooks: RunHooks | None = None,
            options: RunOptions | None = None) -> dict[str, float]:
    """Run ``spec`` to completion on the connected Ray cluster; checkpoints and the final
    artifact go to ``job_dir``. Resumes from ``job_dir``'s checkpoint when there is one.

    Returns the final evaluation. Raises :class:`~metaserve.workers.exceptions.JobCancelled`,
    :class:`~metaserve.workers.exceptions.Unschedulable`, or the job's own error (bad
    dataset, corrupt checkpoint, ...).
    """
    spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
    hooks = hooks or RunHooks()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    driver = job_kind(spec).driver(spec, hooks, options or RunOptions())
    try:
        return train_loop(driver, job_dir, hooks)
    finally:
        driver.close()
