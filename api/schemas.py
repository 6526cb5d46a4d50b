"""API schemas, separate from the table models. The job request body is
:class:`metaserve.workers.spec.JobSpec` itself: one definition for the API, the CLI and the engine."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, Iterable, Union

from fastapi import Response
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import to_json

from metaserve.service.jobs import outcome
from metaserve.service.orm import JobStatus


def model_response(model: BaseModel, status_code: int = 200,
                   headers: dict[str, str] | None = None) -> Response:
    """``model`` as a JSON response, serialized once (the route declares ``response_model``
    for the schema; FastAPI does not validate a returned ``Response`` again)."""
    return Response(model.model_dump_json(), status_code=status_code, headers=headers,
                    media_type="application/json")


class StatusEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    status: JobStatus
    attempt: int
    message: str | None
    error: str | None
    time: datetime = Field(validation_alias=AliasChoices("time", "created_at"),
                           description="When the job entered this status.")


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    status: JobStatus
    spec: dict[str, Any] = Field(description="The spec as stored, every default filled in; "
                                             "`spec.name` is the job's name.")
    attempt: int = Field(description="Attempts so far: the job's own failures count, "
                                     "interruptions do not (`max_attempts` bounds it).")
    max_attempts: int
    interruptions: int = Field(0, description="Times the job was handed back through no fault "
                               "of its own (a drained dispatcher, a lost node, database or "
                               "dispatcher) and resumed from its last checkpoint; never "
                               "counted toward `max_attempts`.")
    progress: dict[str, Any]
    message: str | None = Field(description="What the job waits for while queued (a slot, the "
                                             "running-jobs quota, placement, the artifact store), "
                                             "or the last word on it.")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None = Field(None, description="Seconds from start to finish (to now "
                                                       "while it runs); null before it starts.")
    sweep_id: str | None = Field(None, description="The sweep this job is a trial of.")
    driver_of_sweep: str | None = Field(None, description="The sweep this job drives (its "
                                                          "trials are folded under it).")
    trial_count: int | None = Field(None, description="A sweep driver's trials so far.")
    latest_metrics: dict[str, float | None] = Field(
        default_factory=dict, description="Each metric's value at its last step (null: NaN "
                                          "or ±inf).")
    status_history: list[StatusEventPublic] | None = Field(
        None, description="Every status change, oldest first (`GET /v1/jobs/{id}` only).")

    outcome: str | None = Field(None, description=(
        "How it ended: succeeded, failed, cancelled, or stopped (a sweep trial its scheduler "
        "stopped early: a result, not a cancel; `message` says at which iteration and why). "
        "Null until it ends."))

    @model_validator(mode="after")
    def _derived(self) -> "JobPublic":
        if self.spec.get("name") != self.name:
            self.spec = {**self.spec, "name": self.name}
        self.outcome = outcome(self.status.value, self.message)
        if self.outcome is not None and "eta_s" in self.progress:  # no ETA once it ended
            self.progress = {key: value for key, value in self.progress.items()
                             if key != "eta_s"}
        if self.duration_s is None and self.started_at is not None:
            end = self.finished_at or datetime.now(timezone.utc)
            self.duration_s = round(max(0.0, (end - self.started_at).total_seconds()), 3)
        return self

    @field_validator("latest_metrics", mode="before")
    @classmethod
    def _finite_or_null(cls, values: Any) -> Any:
        if isinstance(values, dict):
            return {name: (None if isinstance(value, float) and not math.isfinite(value)
                           else value) for name, value in values.items()}
        return values


class JobsPublic(BaseModel):
    data: list[JobPublic]
    total: int = Field(0, description="Jobs matching the filters, on every page.")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class ParameterPublic(BaseModel):
    name: str
    type: str
    default: Any = None
    bounds: dict[str, Any] = Field(default_factory=dict,
                                   description="minimum/maximum (inclusive), exclusiveMinimum/"
                                               "exclusiveMaximum, choices, item bounds.")
    description: str | None = None


class CatalogEntry(BaseModel):
    name: str
    description: str
    parameters: list[ParameterPublic]
    source: str = Field("builtin", description="builtin, or plugin (an installed package's "
                                               "entry point; see docs/PLUGINS.md).")
    package: str | None = Field(None, description="A plugin's distribution package.")
    version: str | None = Field(None, description="A plugin's package version.")
    json_schema: dict[str, Any] = Field(default_factory=dict,
                                        description="The JSON schema of its spec object.")


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorInfo


class MetricPointPublic(BaseModel):
    """One value of one series; ``value`` is null where it was NaN or ±inf (JSON has no such
    numbers, and a diverging run produces them)."""

    model_config = ConfigDict(from_attributes=True)

    step: int
    name: str
    value: float | None
    time: datetime = Field(validation_alias=AliasChoices("time", "created_at"),
                           description="When the dispatcher stored the value.")

    @field_validator("value", mode="before")
    @classmethod
    def _finite_or_null(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value


class MetricsPublic(BaseModel):
    data: list[MetricPointPublic] = Field(description="Ordered by (step, name); whole steps only.")
    next_since_step: int | None = Field(
        None, description="Pass as `since_step` for the next page; null on the last page.")


def metrics_response(rows: Iterable[Any], next_since_step: int | None) -> Response:
    """The :class:`MetricsPublic` of ``rows`` (each with ``step``, ``name``, ``value``,
    ``created_at``) as a JSON response: the bytes ``MetricsPublic(data=[MetricPointPublic
    .model_validate(row) ...]).model_dump_json()`` makes (a test holds them equal), serialized
    by pydantic-core in one call without a model per value, which for a page of 1,000 values
    cost more than the query. Non-finite values become null, as the model's validator does."""
    body = to_json({"data": [{"step": row.step, "name": row.name, "value": row.value,
                              "time": row.created_at} for row in rows],
                    "next_since_step": next_since_step}, inf_nan_mode="null")
    return Response(body, media_type="application/json")


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str = Field(description="Pass to `GET /v1/jobs/{id}/artifacts/{name}` to download.")
    size: int = Field(description="Bytes.")
    sha256: str
    media_type: str
    created_at: datetime


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]


# --------------------------------------------------------------------------- adaptation

MAX_ADAPT_POINTS = 1000
"""Most rows in each of support_x, support_y and query_x of one adapt request."""
MAX_ADAPT_VALUES = 250_000
"""Most numbers in one array of an adapt request (e.g. 318 glyphs of 28×28); larger → 413."""


MAX_ADAPT_COLUMNS = 10_000
"""Most named columns in the support or query rows of a tabular adapt request."""
AdaptColumn = Annotated[list[Any], Field(min_length=1, max_length=MAX_ADAPT_POINTS)]
AdaptRows = Union[
    Annotated[dict[str, AdaptColumn], Field(min_length=1, max_length=MAX_ADAPT_COLUMNS)],
    Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_ADAPT_POINTS)],
]


def _given(*names: str) -> dict:
    """JSON Schema: each of ``names`` is present and not null."""
    return {"required": list(names), "properties": {name: {"not": {"type": "null"}}
                                                    for name in names}}


class AdaptRequest(BaseModel):
    """A support set and query inputs of one task.

    Regression families: ``support_x`` ``[n, 1]``, ``support_y`` ``[n, 1]``, ``query_x``
    ``[m, 1]``. Image families: ``support_x`` and ``query_x`` ``[n, channels, size, size]``
    with values in [0, 1], ``support_y`` ``[n]`` class indices in ``[0, ways)``.

    Tabular jobs take a new entity's *raw* rows, scaled by the server with the job's recipe:
    ``support`` and ``query`` as named columns (``{"x1": [...], "y": [...]}``) or row objects
    (``[{"x1": 0.3, "y": 2.5}, ...]``), the support rows holding the target(s) and, with a time
    column, the time; or ``support_x`` ``[n, features]`` / ``support_y`` ``[n]`` (raw labels or
    values) / ``query_x`` ``[m, features]`` in the job's feature order.
    """

    # The two forms, for the schema: arrays (support_x, support_y, query_x) or rows (support,
    # query), never parts of both (what ``_one_form`` checks; a null is an absent field).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {**_given("support_x", "support_y", "query_x"),
         "not": {"anyOf": [_given("support"), _given("query")]}},
        {**_given("support", "query"),
         "not": {"anyOf": [_given("support_x"), _given("support_y"), _given("query_x")]}}]})

    support_x: list[Any] | None = Field(None, min_length=1, max_length=MAX_ADAPT_POINTS)
    support_y: list[Any] | None = Field(None, min_length=1, max_length=MAX_ADAPT_POINTS)
    query_x: list[Any] | None = Field(None, min_length=1, max_length=MAX_ADAPT_POINTS)
    support: AdaptRows | None = Field(None, description="Tabular jobs: the support rows, raw.")
    query: AdaptRows | None = Field(None, description="Tabular jobs: the query rows, raw.")
    steps: int | None = Field(None, ge=0, le=100, description="Inner steps (default: the job's).")

    @model_validator(mode="after")
    def _one_form(self) -> "AdaptRequest":
        rows = {"support": self.support, "query": self.query}
        arrays = {"support_x": self.support_x, "support_y": self.support_y, "query_x": self.query_x}
        if any(value is not None for value in rows.values()):
            given = [name for name, value in arrays.items() if value is not None]
            if given:
                raise ValueError(f"{given[0]}: give rows (support, query) or arrays (support_x, "
                                 "support_y, query_x), not both")
            missing = [name for name, value in rows.items() if value is None]
        else:
            missing = [name for name, value in arrays.items() if value is None]
        if missing:
            raise ValueError(f"{missing[0]}: field required")
        return self

    def inputs(self) -> dict[str, Any]:
        """The arrays or rows given, by field name."""
        names = (("support", "query") if self.support is not None
                 else ("support_x", "support_y", "query_x"))
        return {name: getattr(self, name) for name in names}


class AdaptResponse(BaseModel):
    predictions: list[Any] = Field(description="Regression: ``[m, targets]`` outputs (tabular: in "
                                               "the targets' units); classification: ``[m, ways]`` "
                                               "logits.")
    labels: list[Any] | None = Field(None, description="Classification: the predicted class of "
                                                       "each query input (tabular: its raw label).")
    classes: list[Any] | None = Field(None, description="Tabular classification: the raw label of "
                                                        "each logit column.")
    targets: list[str] | None = Field(None, description="Tabular: the target column of each "
                                                        "prediction column.")
    steps: int = Field(description="Inner steps applied.")
    algorithm: str


# --------------------------------------------------------------------------- datasets


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Name it in a spec: `task_family: {name: images, dataset: <id>}` "
                                "or `{name: tabular, dataset: <id>, task_column: ..., target: ...}`.")
    name: str
    kind: str = Field(description="images (npz, zip or tar of images) or table (CSV, Parquet).")
    format: str = Field(description="What was uploaded: npz, imagefolder, omniglot, csv or "
                                    "parquet.")
    classes: int | None = Field(None, description="Images: classes; null for a table.")
    images: int | None = Field(None, description="Images: images; null for a table.")
    shape: list[int] | None = Field(None, description="Images: [C, H, W] of every stored image.")
    meta: dict[str, Any] | None = Field(None, description=(
        "What a spec is checked against at submit. Images: classes, images per class (min, max, "
        "histogram [[images, classes], ...]). Table: rows, columns (name, type number|category, "
        "missing, non_numeric, nonfinite, distinct, min, max, constant, categories) and groups "
        "(per possible task column: tasks, min_rows, max_rows, rows_histogram [[rows, tasks], "
        "...]). Null for datasets uploaded before it was recorded."))
    split_sizes: dict[str, Any] | None = Field(None, description=(
        "What the default split (0.7/0.15/0.15, split_seed 0) produces: classes per split, or "
        "tasks per split for each possible task column."))
    usable_for: list[str] | None = Field(None, description=(
        "The jobs this dataset can serve, e.g. \"images 5-way with support_shots + query_shots "
        "up to 20 (default split)\"; empty with unusable_reason when none can."))
    unusable_reason: str | None = None
    bytes: int = Field(description="Size of the upload as sent.")
    sha256: str = Field(description="sha256 of the upload as sent.")
    status: str = Field(description="ready: an upload is converted before its 201.")
    created_at: datetime

    @classmethod
    def of(cls, dataset: Any) -> "DatasetPublic":
        """The dataset row described (its default split and ``usable_for``)."""
        from metaserve.service.dataset_checks import describe

        return cls.model_validate({
            **{name: getattr(dataset, name) for name in (
                "id", "name", "kind", "format", "classes", "images", "shape", "meta", "bytes",
                "sha256", "status", "created_at")},
            **describe(dataset.kind, dataset.meta)})


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


# --------------------------------------------------------------------------- registered models

_DESCRIPTION = Field(None, max_length=5000, pattern=r"^[^\x00]*$",  # PostgreSQL text holds no NUL
                     description="Free text.")


class RegisteredModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                      description="Letters, digits, `.`, `_`, `-`; starts with a letter or digit "
                                  "(at most 100): a path segment of `models:/NAME@ALIAS`.")
    description: str | None = _DESCRIPTION


class RegisteredModelPublic(BaseModel):
    name: str
    description: str | None
    latest_version: int | None = Field(description="The highest version number; null before any.")
    version_count: int
    aliases: dict[str, int] = Field(description="Each alias and the version it points at.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, view: Any) -> "RegisteredModelPublic":
        """A :class:`metaserve.service.registered_models.ModelView` described."""
        model = view.model
        return cls(name=model.name, description=model.description,
                   latest_version=view.latest_version, version_count=view.version_count,
                   aliases=view.aliases, created_at=model.created_at, updated_at=model.updated_at)


class RegisteredModelsPublic(BaseModel):
    data: list[RegisteredModelPublic]


class ModelVersionCreate(BaseModel):
    # For the schema: exactly one of the two sources (what ``_one_source`` checks).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {**_given("job_id"), "not": _given("sweep_id")},
        {**_given("sweep_id"), "not": _given("job_id")}]})

    job_id: str | None = Field(None, min_length=1, max_length=100,
                               pattern=r"^[^\x00-\x1f\x7f-\x9f]*$",
                               description="A succeeded job of yours.")
    sweep_id: str | None = Field(None, min_length=1, max_length=100,
                                 pattern=r"^[^\x00-\x1f\x7f-\x9f]*$",
                                 description="A sweep of yours: its best succeeded trial.")
    description: str | None = _DESCRIPTION

    @model_validator(mode="after")
    def _one_source(self) -> "ModelVersionCreate":
        if (self.job_id is None) == (self.sweep_id is None):
            raise ValueError("give exactly one of job_id and sweep_id")
        return self


class ModelVersionPublic(BaseModel):
    name: str = Field(description="The registered model's name.")
    version: int
    job_id: str = Field(description="The job whose final artifact this version is.")
    sweep_id: str | None = Field(description="The job's sweep, when it is a sweep's trial.")
    artifact_kind: str = Field(description="`meta_init` or `meta_policy`.")
    description: str | None
    aliases: list[str]
    uri: str = Field(description="`models:/NAME/VERSION`, for `Client.load_meta_init`.")
    created_at: datetime

    @classmethod
    def of(cls, view: Any) -> "ModelVersionPublic":
        """A :class:`metaserve.service.registered_models.VersionView` described."""
        version = view.version
        return cls(name=view.model, version=version.version, job_id=version.job_id,
                   sweep_id=view.sweep_id, artifact_kind=version.artifact_kind,
                   description=version.description, aliases=view.aliases,
                   uri=f"models:/{view.model}/{version.version}", created_at=version.created_at)


class ModelVersionsPublic(BaseModel):
    data: list[ModelVersionPublic]


class ModelAliasSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1,
                         description="The version the alias points at from now on.")
