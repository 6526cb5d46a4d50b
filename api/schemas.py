"""API schemas, separate from the table models. The job request body is
:class:`workers.spec.JobSpec` itself: one definition for the API, the CLI and the engine."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.models import JobStatus
from workers.spec import JobSpec

JobCreate = JobSpec


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    status: JobStatus
    spec: dict[str, Any]
    attempt: int
    max_attempts: int
    progress: dict[str, Any]
    message: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
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


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorInfo
