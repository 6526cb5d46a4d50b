"""SQLAlchemy 2 table models. The schema is changed only by Alembic migrations
(``migrations/versions``); ``alembic check`` proves these models and the migrations agree."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from metaserve.service.ids import new_id

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(str, enum.Enum):
    """Where a job is in its life: queued → running → succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


def status_check_sql(column: str = "status") -> str:
    """The CHECK expression allowing exactly the values of :class:`JobStatus`."""
    values = ", ".join(f"'{status.value}'" for status in JobStatus)
    return f"{column} IN ({values})"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use an aware UTC datetime")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class User(Base):
    """An API key holder. Only the sha256 of the key is stored."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a dispatcher last claimed a queued job of this user: the round-robin turn of the
    # fair claim (service/claims.py, claim_next_job); on PostgreSQL its row is the per-user
    # claim lock.
    last_claimed_at: Mapped[datetime | None]


class Job(Base):
    """A meta-training job and its place in the state machine of DESIGN.md."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(status_check_sql(), name="status"),
        CheckConstraint("attempt >= 0", name="attempt_non_negative"),
        CheckConstraint("interruptions >= 0", name="interruptions_non_negative"),
        UniqueConstraint("owner_id", "idempotency_key"),
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_owner_id_id", "owner_id", "id"),
        # The fair claim: each user's oldest queued job, each user's running count.
        Index("ix_jobs_status_owner_id_id", "status", "owner_id", "id"),
        # A sweep's trials (GET /v1/jobs?sweep=...), and one job per Tune trial.
        Index("ix_jobs_sweep_id_id", "sweep_id", "id"),
        UniqueConstraint("sweep_id", "trial_id"),
    )

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    # attempt: the claims of this job, less its handbacks (below): it counts the job's own
    # failures toward max_attempts. With interruptions it is the fencing token of a run's
    # writes (job_store.Lease).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Handbacks that were no fault of the job (a drained dispatcher, a lease that lapsed: a
    # lost node, database or dispatcher): never counted toward max_attempts.
    interruptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    message: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # A sweep's trial (service/sweeps.py): never claimed, its sweep's driver job runs it.
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    trial_id: Mapped[str | None] = mapped_column(String(64))
    # A finished job's metrics were downsampled to at most this many points per series
    # (service/metrics_retention.py); NULL: not yet.
    metrics_kept_per_series: Mapped[int | None] = mapped_column(Integer)

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)


class JobStatusEvent(Base):
    """One status change of a job, written in the transaction of the change: the durable
    history the event stream is built from, so no transition is lost between two polls."""

    __tablename__ = "job_status_events"
    __table_args__ = (Index("ix_job_status_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Metric(Base):
    """One value of one named series at one step. (job_id, name, step) is unique, so a
    resumed job re-writing a step is ignored; (job_id, id) is the event streams' read order,
    (job_id, step, name) the metrics pages'."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "name", "step"),
                      Index("ix_metrics_job_id_id", "job_id", "id"),
                      Index("ix_metrics_job_id_step_name", "job_id", "step", "name"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float)  # NULL: the value was NaN or ±inf
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A file a job produced (e.g. ``meta_init.safetensors``); the bytes live under
    ``ARTIFACT_ROOT``, this row describes them."""

    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobLogLine(Base):
    """One log record of a job (a line, or a message with its traceback) from its driver or an
    inner-loop worker. ``seq`` numbers a job's records from 1 across attempts; the oldest are
    deleted past the per-job cap (service/job_logs.py), so ``min(seq) - 1`` records were dropped."""

    __tablename__ = "job_logs"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime]
    level: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)


DATASET_STATUSES = ("ready",)
"""An upload is converted inside its request: a dataset row exists only once it is ready."""


class Dataset(Base):
    """A user's uploaded dataset: few-shot images (:mod:`metaserve.workers.tasks.uploaded`) or
    a task-grouped table (:mod:`metaserve.workers.tasks.table_format`); its canonical files
    live in the artifact store under its id. ``meta`` is what submit checks a spec against
    (class sizes; columns and task groups); null on rows uploaded before it was recorded,
    whose specs are then checked when the job runs."""

    __tablename__ = "datasets"
    __table_args__ = (
        CheckConstraint("status IN ('ready')", name="status"),
        CheckConstraint("kind IN ('images', 'table')", name="kind"),
        Index("ix_datasets_owner_id_id", "owner_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(29), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16), default="images", server_default="images")
    format: Mapped[str] = mapped_column(String(16))
    classes: Mapped[int | None] = mapped_column(Integer)
    images: Mapped[int | None] = mapped_column(BigInteger)
    shape: Mapped[list[int] | None] = mapped_column(JSON)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="ready")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Sweep(Base):
    """A hyperparameter sweep (service/sweeps.py): the request as submitted (base spec, space,
    search, scheduler) and its driver job, a plain job row that dispatchers claim and lease
    and whose run is the Ray Tune driver. Status, attempts, logs and the sweep's artifacts
    are the driver job's (its Idempotency-Key too); the trials are job rows with
    ``sweep_id``."""

    __tablename__ = "sweeps"
    __table_args__ = (
        Index("ix_sweeps_owner_id_id", "owner_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(29), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]]
    config_hash: Mapped[str] = mapped_column(String(64))
    # No foreign key: jobs.sweep_id already points here (a cycle would need ALTERs); the
    # driver job is created with the sweep, and both go with their owner.
    driver_job_id: Mapped[str] = mapped_column(String(26), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RegisteredModel(Base):
    """A name a user keeps results under (MLflow's registered model): numbered versions, each
    a succeeded job's final artifact, and aliases pointing at versions
    (service/registered_models.py). ``last_version`` is the counter versions are numbered
    from: incremented in the statement that registers one, so two registrations at once get
    two numbers, and a deleted version's number is never given again."""

    __tablename__ = "registered_models"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(Text)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelVersion(Base):
    """Version ``version`` of a registered model: the final artifact (``artifact_kind``) of
    job ``job_id``, referenced, not copied. The job's foreign key has no ``ON DELETE``: a job
    a version uses cannot be deleted (its owner's deletion takes both in one statement)."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),
                      Index("ix_model_versions_job_id", "job_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    artifact_kind: Mapped[str] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelAlias(Base):
    """A name (``production``) pointing at one version of a registered model; moving it is an
    update of ``version``. It goes with its version."""

    __tablename__ = "model_aliases"
    __table_args__ = (
        ForeignKeyConstraint(["model_id", "version"],
                             ["model_versions.model_id", "model_versions.version"],
                             ondelete="CASCADE"),
    )

    model_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
