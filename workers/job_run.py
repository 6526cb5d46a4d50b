"""What a job's supervisor is given and gives its job kind: plain, picklable data (Ray carries
it to the supervisor's node as it is; the spec is parsed once, where the dispatcher read the
job's row, :func:`metaserve.service.job_runs.job_run`).

The events of a run, streamed by :meth:`~metaserve.workers.supervisor.JobSupervisor.run` as
``(job_id, kind, payload)``, are one vocabulary for a job and for the jobs it starts (a
sweep's trials), keyed by the job they belong to:

==============  ===============================================================================
kind            payload
==============  ===============================================================================
``started``     ``{"key", "spec", "name"}``: a job of this run's starts (a sweep's trial: ``key``
                is its Tune trial id; its row is created, or its next attempt counted)
``metrics``     ``(step, {name: value})``
``progress``    ``{iteration, total, ...}``
``placement``   ``{"driver": {...}, "workers": [{...}, ...]}``: node, pid and device
``files``       ``[ArtifactFile, ...]``: published to the artifact store, to be registered
``logs``        ``[record, ...]``: log records (:mod:`metaserve.workers.log_capture`)
``ended``       ``{"status", "message", "error"}``: a started job ended (succeeded, failed, or
                cancelled: stopped early by the sweep's scheduler, or by its owner)
==============  ===============================================================================
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from metaserve.workers.cost import CostLimits
from metaserve.workers.engine.loop import RunHooks
from metaserve.workers.object_store import ArtifactStore
from metaserve.workers.runner import RunOptions
from metaserve.workers.spec import JobSpec

SCRATCH_PREFIX = "metaserve-job-"
"""A run's scratch directories: ``<tmp>/metaserve-job-<job_id>-p<pid>-*`` (one per process, so
a killed one's are found and removed)."""
EVENT_KINDS = ("started", "metrics", "progress", "placement", "files", "logs", "ended")


@dataclass(frozen=True)
class Trial:
    """A trial a previous attempt of the sweep recorded: its job keeps its id on every
    attempt, and a finished one is reported to Tune, not trained again."""

    job_id: str
    status: str
    value: float | None = None
    step: int | None = None
    test_value: float | None = None
    """Its final value of the held-out test counterpart of the sweep's metric, as recorded
    (:func:`~metaserve.workers.sweep_spec.held_out_score`)."""


@dataclass(frozen=True)
class SweepRun:
    """What a sweep's Tune driver needs besides its driver job's (base) spec."""

    sweep_id: str
    name: str
    config: dict[str, Any]
    """The canonical sweep (:func:`metaserve.service.sweeps.validate_sweep`): ``spec`` (the
    base spec as JSON data, onto which a trial's sampled values are written), ``space``,
    ``search``, ``scheduler``, ``num_samples``, ``trials``."""
    trials: dict[str, Trial] = field(default_factory=dict)
    max_concurrent_trials: int | None = None
    limits: CostLimits | None = None
    """The server's per-job limits: a trial whose sampled spec breaks one fails before it
    trains (as a job submitted with that spec would be refused)."""


@dataclass(frozen=True)
class JobRun:
    """One attempt of a claimed job."""

    job_id: str
    spec: JobSpec
    attempt: int
    memory_bytes: int
    """The driver's ``memory`` request (Ray places the supervisor by it; it stops past it)."""
    sweep: SweepRun | None = None
    claims: int = 0
    """How often the job has been claimed, this claim included (``attempt`` + the handbacks
    that did not count as attempts): grows with every run of the job, so it is the fencing
    token of the run's artifact-store writes (:attr:`fence`). 0: not given (``attempt``)."""

    @property
    def fence(self) -> int:
        """The run's token in the artifact store: a newer run always has a larger one."""
        return max(self.claims, self.attempt)


@dataclass
class JobContext:
    """What the supervisor gives its job kind's run (:attr:`metaserve.workers.registry.JobKind.run`)."""

    hooks: RunHooks
    """The job's own reports (metrics, progress, checkpoints, stop requests)."""
    options: RunOptions
    emit: Callable[[str, str, Any], None]
    """``emit(job_id, kind, payload)``: an event of this run (see the module docstring)."""
    store: ArtifactStore
    supervisor: Any = None
    """The supervisor's Ray actor handle: remote parts of the run (a sweep's trials) report
    through its ``event``, ``wait_recorded`` and ``should_stop``."""


def node_info() -> dict[str, Any]:
    """Where this process runs: Ray node id, host name and pid."""
    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid()}
