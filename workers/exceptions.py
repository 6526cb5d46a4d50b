"""The exceptions of ``metaserve.workers``, in one place.

The dispatcher settles a job attempt by the class of the error it ended with
(:func:`metaserve.service.dispatcher.classify_job_error`): a ``ValueError`` (bad spec,
dataset or checkpoint) or a ``MemoryError`` fails the job at once, :class:`Unschedulable`
and :class:`StorageError` put it back in the queue with the reason, anything else is retried
from the last checkpoint. The base classes below are chosen for that.
"""

from __future__ import annotations


class JobCancelled(Exception):
    """The job was cancelled (or its lease was lost) while it ran."""


class Unschedulable(Exception):
    """The cluster cannot provide the resources this job asks for."""


class PlacementTimeout(ValueError):
    """With an autoscaling cluster: the job's driver or its workers' placement group stayed
    pending past the pending timeout (no node that fits came up). Fails the job at once: a
    retry would wait the same way."""


class WorkerLost(Exception):
    """An inner-loop worker died more times than the runner will replace it."""


class CheckpointError(ValueError):
    """The checkpoint is unreadable or inconsistent."""


class DatasetError(ValueError):
    """A dataset that cannot be read, or that is too small for the spec."""


class FieldError(ValueError):
    """An error about one part of a spec or request: ``field`` names it (``task_family.target``,
    ``support.x1``, ``space``), ``message`` says what is wrong with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple:  # pickled across Ray with its two arguments
        return type(self), (self.field, self.message)


class TableSpecInvalid(FieldError, DatasetError):
    """A ``tabular`` spec that its table cannot serve (a missing column, too few rows, ...)."""


class RowsInvalid(FieldError):
    """Raw rows that do not fit a ``tabular`` job's recipe (a missing or unknown column, a
    label the table never had, support rows after query rows, ...)."""


class TrialOverLimits(ValueError):
    """A sweep's trial whose sampled spec breaks the server's per-job limits."""


class ArtifactError(ValueError):
    """A directory that holds no readable artifact of the kind asked for."""


class StorageError(Exception):
    """The artifact store failed; ``str()`` is one line naming the store and the cause."""


class AttemptFenced(StorageError):
    """A newer attempt of the job has published to the artifact store: this (stale) attempt's
    checkpoint or artifact is refused, and nothing it uploaded is kept."""


class DriverOutOfMemory(MemoryError):
    """The job's driver used more memory than it asked Ray for."""


class SweepError(FieldError):
    """A sweep that cannot run as asked: ``field`` names the part of the request."""


class PluginError(Exception):
    """Why one entry point cannot be used (it becomes a
    :class:`~metaserve.workers.plugins.BrokenPlugin`)."""


class PluginSpecInvalid(FieldError):
    """A plugin's network or task family that fails on a job's spec (its own code raised):
    ``field`` names the part of the spec (``model`` or ``task_family``)."""


__all__ = ["ArtifactError", "CheckpointError", "DatasetError", "DriverOutOfMemory", "FieldError",
           "JobCancelled", "PluginError", "PluginSpecInvalid", "RowsInvalid", "StorageError", "SweepError",
           "TableSpecInvalid", "TrialOverLimits", "Unschedulable", "WorkerLost"]
