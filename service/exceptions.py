"""Domain errors. Each subclass's docstring is its default message; the API maps
``status_code`` and ``code`` to the HTTP error response."""

from __future__ import annotations

from typing import Any


class MetaserveError(Exception):
    """Internal error."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__doc__ or self.__class__.__name__).strip()
        self.details = details
        super().__init__(self.message)

    def __reduce__(self) -> tuple:
        # Picklable with its details (an adapt process sends its errors back to the API).
        return _rebuild_error, (type(self), self.message, self.details,
                                self.__dict__.get("headers"))


def _rebuild_error(cls: type[MetaserveError], message: str, details: dict[str, Any],
                   headers: dict[str, str] | None) -> MetaserveError:
    error = cls(message, **details)
    if headers is not None:
        error.headers = headers
    return error


class Unauthorized(MetaserveError):
    """Missing or invalid API key."""

    status_code = 401
    code = "unauthorized"


class JobNotFound(MetaserveError):
    """Job not found."""

    status_code = 404
    code = "not_found"


class IdempotencyConflict(MetaserveError):
    """This Idempotency-Key was already used with a different job body."""

    status_code = 409
    code = "idempotency_conflict"


class InvalidTransition(MetaserveError):
    """The job is not in a state that allows this."""

    status_code = 409
    code = "invalid_transition"


class LeaseLost(MetaserveError):
    """This worker no longer holds the job's lease."""

    status_code = 409
    code = "lease_lost"


class RetryLater(MetaserveError):
    """Busy; retry later. Answered with ``Retry-After: retry_after_s``."""

    def __init__(self, message: str | None = None, *, retry_after_s: int, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QuotaExceeded(RetryLater):
    """A per-user limit is reached; retry later."""

    status_code = 429
    code = "quota_exceeded"


class MetaInitNotReady(MetaserveError):
    """The job has no meta-initialization yet: only a succeeded job can adapt."""

    status_code = 409
    code = "not_ready"


class NotAdaptable(MetaserveError):
    """The job's artifact is a meta-policy, which adapts by acting in its task, not on arrays."""

    status_code = 409
    code = "not_adaptable"


class InvalidAdaptInput(MetaserveError):
    """The arrays do not fit the job's task family."""

    status_code = 422
    code = "validation_error"


class AdaptInputTooLarge(MetaserveError):
    """An array of the request holds more numbers than the server adapts on."""

    status_code = 413
    code = "payload_too_large"


class AdaptBusy(MetaserveError):
    """Every adapt process is busy and the queue is full; retry later."""

    status_code = 503
    code = "service_unavailable"


class AdaptTimedOut(MetaserveError):
    """The adaptation did not finish in time."""

    status_code = 504
    code = "gateway_timeout"


class AdaptProcessDied(MetaserveError):
    """The adapt process ended before it answered (e.g. killed for memory); retry later."""

    status_code = 503
    code = "service_unavailable"


class AdaptDiverged(MetaserveError):
    """The adaptation produced non-finite predictions."""

    status_code = 422
    code = "validation_error"


class DatasetNotFound(MetaserveError):
    """Dataset not found."""

    status_code = 404
    code = "not_found"


class InvalidDataset(MetaserveError):
    """The upload is not a dataset this server reads."""

    status_code = 422
    code = "invalid_dataset"


class DatasetTooLarge(MetaserveError):
    """The upload is larger than this server accepts."""

    status_code = 413
    code = "payload_too_large"


class DatasetLimitExceeded(MetaserveError):
    """The dataset is larger than this server accepts."""

    status_code = 422
    code = "limit_exceeded"


class ConversionsBusy(RetryLater):
    """Every upload conversion slot is taken; retry later."""

    status_code = 503
    code = "service_unavailable"


class DatasetQuotaExceeded(MetaserveError):
    """Your datasets reach a per-user dataset quota; delete one (DELETE /v1/datasets/{id})
    before uploading another."""

    status_code = 429
    code = "quota_exceeded"


class DatasetInUse(MetaserveError):
    """A queued or running job uses this dataset."""

    status_code = 409
    code = "dataset_in_use"


class DatasetReferenceInvalid(MetaserveError):
    """The spec names a dataset this key may not use."""

    status_code = 422
    code = "validation_error"


class DatasetPathForbidden(MetaserveError):
    """Only an admin key may name a dataset path on the server."""

    status_code = 403
    code = "forbidden"


class SweepNotFound(MetaserveError):
    """Sweep not found."""

    status_code = 404
    code = "not_found"


class InvalidSweep(MetaserveError):
    """The sweep cannot run as asked."""

    status_code = 422
    code = "validation_error"


class InvalidCursor(MetaserveError):
    """Invalid pagination cursor."""

    status_code = 400
    code = "invalid_cursor"


class InvalidListQuery(MetaserveError):
    """A query parameter of a list that cannot be served (its one detail names it)."""

    status_code = 422
    code = "validation_error"

    @property
    def field(self) -> str:
        return next(iter(self.details))


class InvalidEventId(MetaserveError):
    """Invalid Last-Event-ID: expected the id of an event of this stream, e.g. 5-120-50."""

    status_code = 422
    code = "validation_error"


class TooManyStreams(RetryLater):
    """Too many open event streams of this user."""

    status_code = 429
    code = "too_many_requests"


class KeyNotFound(MetaserveError):
    """No such API key."""

    status_code = 404
    code = "not_found"


class AdminOnly(MetaserveError):
    """Only an admin key may do this."""

    status_code = 403
    code = "forbidden"


class PluginSpecRefused(MetaserveError):
    """An installed plugin cannot build this job (its network or task family raised)."""

    status_code = 422
    code = "validation_error"


class CostLimitExceeded(MetaserveError):
    """The job is larger than this server accepts."""

    status_code = 422
    code = "limit_exceeded"


class AdaptFailed(MetaserveError):
    """The adaptation failed inside the adapt process."""


class ArtifactNotFound(MetaserveError):
    """Artifact not found."""

    status_code = 404
    code = "not_found"


class ArtifactStoreUnavailable(MetaserveError):
    """The artifact store is unavailable; try again later."""

    status_code = 503
    code = "storage_unavailable"


class RegisteredModelNotFound(MetaserveError):
    """Registered model not found."""

    status_code = 404
    code = "not_found"


class RegisteredModelExists(MetaserveError):
    """You already have a registered model of this name."""

    status_code = 409
    code = "already_exists"


class ModelVersionNotFound(MetaserveError):
    """Model version not found."""

    status_code = 404
    code = "not_found"


class ModelAliasNotFound(MetaserveError):
    """Model alias not found."""

    status_code = 404
    code = "not_found"


class JobNotRegistrable(MetaserveError):
    """Only a succeeded job with a final artifact can become a model version."""

    status_code = 409
    code = "not_ready"


class InvalidVersionSource(MetaserveError):
    """Give exactly one of job_id and sweep_id."""

    status_code = 422
    code = "validation_error"


class ReservedAlias(MetaserveError):
    """This alias is reserved for version numbers (latest, v<N>)."""

    status_code = 422
    code = "validation_error"
