"""Every job kind runs through one contract: this registry → one supervisor
(:class:`~metaserve.workers.supervisor.JobSupervisor`) → the kind's :attr:`JobKind.run`. The
training kinds run one driver interface (:class:`~metaserve.workers.engine.loop.Driver`) under
:func:`~metaserve.workers.engine.loop.train_loop`'s schedule, one checkpoint format
(:mod:`~metaserve.workers.engine.checkpoints`), one artifact writer
(:mod:`~metaserve.workers.engine.final_artifact`); a sweep runs Ray Tune, each of its trials a
job of its own trained by :func:`run_job`.

==============  =======================================  ==================  =====================
kind            algorithms                               driver              artifact
==============  =======================================  ==================  =====================
meta_learning   maml, reptile, anil, metasgd, prompt,    MetaLearningRay…    ``meta_init.*``
                protonet, finetune, mamlpp,
                metacurvature
meta_rl         rl2, pearl, maml on an RL task family    RLDriver            ``meta_policy.*``
sweep           any of the above, as its trials          Ray Tune            the best trial's
==============  =======================================  ==================  =====================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metaserve.workers.engine.loop import Driver, RunHooks, train_loop
from metaserve.workers.job_run import JobContext, JobRun
from metaserve.workers.rl.driver import RLDriver
from metaserve.workers.runner import MetaLearningRayDriver, RunOptions
from metaserve.workers.spec import JobSpec
from metaserve.workers.sweep import run_sweep


@dataclass(frozen=True)
class JobKind:
    """A kind of job: how one attempt of it runs in its supervisor, and how its supervisor is
    placed and stopped."""

    name: str
    run: Callable[[JobRun, Path, JobContext], None]
    """Runs one attempt in the supervisor's scratch directory (its last checkpoint fetched
    there); raises the job's error, :class:`~metaserve.workers.exceptions.JobCancelled` once
    ``context.hooks.should_stop()``."""
    detached: bool = False
    """A detached, named supervisor: the placement groups it makes (a sweep's trials') die
    with it, not with the dispatcher's Ray job."""
    stops_at_once: bool = False
    """Cancel kills the supervisor at once instead of asking it to stop first: a sweep's next
    attempt resumes from Tune's saved state, which a graceful stop would mark finished."""


TRAINING_DRIVERS: dict[str, Callable[[JobSpec, RunHooks, RunOptions], Driver]] = {
    "meta_learning": MetaLearningRayDriver,
    "meta_rl": RLDriver,
}


def run_job(spec: JobSpec, job_dir: Path, hooks: RunHooks | None = None,
            options: RunOptions | None = None) -> dict[str, float]:
    """Train ``spec`` to completion on the connected Ray cluster; checkpoints and the final
    artifact go to ``job_dir``. Resumes from ``job_dir``'s checkpoint when there is one.

    Returns the final evaluation. Raises :class:`~metaserve.workers.exceptions.JobCancelled`,
    :class:`~metaserve.workers.exceptions.Unschedulable`, or the job's own error (bad
    dataset, corrupt checkpoint, ...).
    """
    hooks = hooks or RunHooks()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    driver = TRAINING_DRIVERS["meta_rl" if spec.is_rl else "meta_learning"](
        spec, hooks, options or RunOptions())
    try:
        return train_loop(driver, job_dir, hooks)
    finally:
        driver.close()


def _train(run: JobRun, job_dir: Path, context: JobContext) -> None:
    run_job(run.spec, job_dir, context.hooks, context.options)


def _sweep(run: JobRun, job_dir: Path, context: JobContext) -> None:
    run_sweep(run, job_dir, context, train=run_job)


JOB_KINDS: dict[str, JobKind] = {
    # Not detached: the dispatcher removes a killed supervisor's workers' placement group
    # (runner.remove_job_placement_groups), and a new attempt removes its predecessor's.
    "meta_learning": JobKind("meta_learning", _train),
    "meta_rl": JobKind("meta_rl", _train),
    "sweep": JobKind("sweep", _sweep, detached=True, stops_at_once=True),
}


def job_kind(run: JobRun) -> JobKind:
    """The kind of ``run``: a sweep when it drives one, else meta-RL on an RL task family,
    else meta-learning."""
    if run.sweep is not None:
        return JOB_KINDS["sweep"]
    return JOB_KINDS["meta_rl" if run.spec.is_rl else "meta_learning"]
