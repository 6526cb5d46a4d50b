"""Settings of the metaserve server: one pydantic-settings class, environment prefix ``METASERVE_``.

Clients (the CLI's HTTP commands, the SDK, curl walkthroughs) read ``METASERVE_URL`` and
``METASERVE_API_KEY`` instead; those are not server settings.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from metaserve.workers.object_store import StorageConfig, parse_s3_url

LEASE_S = 30.0
HEARTBEAT_S = 5.0
MAX_BODY_BYTES = 1024 * 1024
DRIVER_MEMORY_MB = 1024
MAX_QUEUED_JOBS_PER_USER = 100
MAX_RUNNING_JOBS_PER_USER = 4
QUOTA_RETRY_AFTER_S = 60
MAX_HEADER_BYTES = 64 * 1024
MAX_URL_BYTES = 8 * 1024
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
BODY_MIN_BYTES_PER_S = 64 * 1024
MAX_CONNECTIONS = 1000
MAX_CONNECTIONS_PER_CLIENT = 512
KEY_CACHE_TTL_S = 60.0
STREAM_KEY_CHECK_S = 2.0
MAX_EVENT_STREAMS_PER_USER = 20
ADAPT_CONCURRENCY = 2
ADAPT_QUEUE = 8
ADAPT_TIMEOUT_S = 30.0
DATASET_MAX_UPLOAD_BYTES = 2 * 1024**3
DATASET_MAX_IMAGES = 1_000_000
DATASET_MAX_IMAGE_SIDE = 512
DATASET_MAX_STORED_BYTES = 16 * 1024**3
DATASET_MAX_ROWS = 10_000_000
DATASET_MAX_COLUMNS = 1_000
DATASET_CONVERT_MEMORY_BYTES = 4 * 1024**3
DATASET_CONVERT_TIMEOUT_S = 600.0
DATASET_CONVERT_CONCURRENCY = 2
DATASET_MAX_EXPANSION = 100
DATASET_MAX_PER_USER = 100
DATASET_MAX_BYTES_PER_USER = 32 * 1024**3


class Settings(BaseSettings):
    """Every server setting; each one is read from ``METASERVE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="METASERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP server listens on.")
    database_url: str = Field(
        "sqlite:///./.metaserve/metaserve.db",
        description="SQLAlchemy URL. SQLite runs in WAL mode with a busy timeout and foreign keys "
                    "on; PostgreSQL: postgresql+psycopg://user@host/db.",
    )
    data_dir: Path = Field(Path("./.metaserve"), description="Where the embedded default keeps "
                           "its state (admin.key, the SQLite file).")
    ray_address: str = Field("", description="Ray cluster address; empty starts a local Ray.")
    ray_auth_token: str = Field("", description="Token for a Ray cluster that requires one "
                                "(exported as RAY_AUTH_TOKEN); empty: none.")
    ray_num_cpus: int = Field(0, ge=0, description="CPUs of the local Ray the server starts; "
                              "0: all of this machine's.")
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1,
                                description="Largest request body accepted (bytes); larger → 413.")
    dispatcher: bool = Field(True, description="Run the job dispatcher inside `metaserve serve`.")
    dispatcher_concurrency: int = Field(2, ge=1, le=1024,
                                        description="Jobs one dispatcher runs at the same time.")
    lease_s: float = Field(LEASE_S, gt=0, description="Job lease length in seconds; a job whose "
                           "lease expires is reclaimed.")
    heartbeat_s: float = Field(HEARTBEAT_S, gt=0,
                               description="Seconds between lease renewals of a running job.")
    drain_grace_s: float = Field(
        30.0, gt=0, le=3600,
        description="On SIGTERM, `metaserve dispatcher` and `metaserve serve` stop claiming, stop "
                    "their running jobs and hand them back (queued again, resumed from their last "
                    "checkpoint, `interruptions` + 1, the attempt not counted), exiting within "
                    "about this many seconds; match the container's stop grace period to it.")
    db_connect_timeout_s: int = Field(
        10, ge=1, le=600,
        description="PostgreSQL: seconds a new connection may take (psycopg connect_timeout); a "
                    "database that does not answer fails the attempt to connect, which is retried.")
    db_statement_timeout_s: float = Field(
        60.0, ge=0, le=86400,
        description="PostgreSQL: the longest one statement may run (statement_timeout) on the "
                    "server's and dispatcher's connections; 0: no limit.")
    db_idle_in_transaction_timeout_s: float | None = Field(
        None, ge=0, le=86400,
        description="PostgreSQL: the longest a dispatcher's connection may sit idle inside a "
                    "transaction (idle_in_transaction_session_timeout); past it the server ends "
                    "the connection and releases its row locks. A dispatcher paused or stalled "
                    "in the middle of a write otherwise keeps its jobs' rows locked, and no other "
                    "dispatcher can take them over when their leases lapse. Unset: the lease "
                    "length (METASERVE_LEASE_S); 0: no limit.")

    # Metrics retention (service/metrics_retention.py): a finished job's series downsampled.
    metrics_max_points_per_series: int = Field(
        10_000, ge=0, le=100_000_000,
        description="Most points a finished job keeps of each metric series (about: up to 3 "
                    "more); past it the dispatcher's retention pass keeps evenly spaced steps, "
                    "the last step and the series' lowest and highest values (the best, whichever "
                    "direction is better), deleting the rest. Running jobs are never touched. "
                    "0: keep every point.")
    metrics_retention_interval_s: float = Field(
        300.0, gt=0, le=86400,
        description="Seconds between a dispatcher's metrics retention passes (each downsamples "
                    "the finished jobs not yet downsampled to the current budget).")

    # Per-user quotas and the fair claim (docs/RELIABILITY.md, "Quotas and fair scheduling").
    # Admin keys are exempt: they are operators' (the embedded default's only key is one), and
    # automation that should be bounded gets a user key. The fair claim order covers admins too.
    # 0 turns a cap off.
    max_queued_jobs_per_user: int = Field(
        MAX_QUEUED_JOBS_PER_USER, ge=0,
        description="Queued jobs one user may have (admin keys are exempt); one more → 429 with "
                    "Retry-After naming the cap (an Idempotency-Key replay still returns its job). "
                    "0: no cap.")
    max_running_jobs_per_user: int = Field(
        MAX_RUNNING_JOBS_PER_USER, ge=0,
        description="Running jobs one user may have across all dispatchers (admin keys are exempt); "
                    "more stay queued with a 'waiting: <user> already runs N jobs' message. 0: no cap.")
    quota_retry_after_s: int = Field(
        QUOTA_RETRY_AFTER_S, ge=1, le=86400,
        description="Retry-After (seconds) of a 429 for the queued-jobs cap.")

    # Sweeps (service/sweeps.py): caps on one sweep, checked at submit (422 naming the field).
    sweep_max_trials: int = Field(256, ge=1, le=100_000,
                                  description="Most trials one sweep may run; more → 422 at submit.")
    sweep_max_pflop: float = Field(
        10_000.0, gt=0, description="Largest estimated training work of a whole sweep, PFLOP: "
                                    "its trials × the work of its most expensive point; more → "
                                    "422 naming `num_samples` at submit.")
    sweep_max_grid: int = Field(256, ge=1, le=100_000,
                                description="Largest grid (product of the domains) of a grid search; larger → 422 at submit.")
    sweep_driver_memory_mb: int = Field(
        1536, ge=256, le=1024 * 1024,
        description="Ray `memory` request of a sweep's driver (the Ray Tune driver), MB.")

    # Where a job's driver and workers are placed on Ray.
    driver_memory_mb: int = Field(
        DRIVER_MEMORY_MB, ge=64, le=1024 * 1024,
        description="Least Ray `memory` request of each job's driver (its supervisor actor; more "
                    "when the job's estimate says so), MB; a driver holding more than its request "
                    "fails its job with an 'out of memory' line, without retry.")
    # Cost limits: a job estimated above one of these is refused with a 422 (service/limits.py).
    max_parameters: int = Field(20_000_000, ge=1,
                                description="Largest network a job may train (parameters); above it a 422 naming `model`.")
    max_worker_memory_mb: int = Field(
        16 * 1024, ge=64, description="Largest estimated memory of one inner-loop worker, MB; above it a 422 "
                                 "naming `task_family` or `meta_batch_size`.")
    max_job_memory_mb: int = Field(
        64 * 1024, ge=64, description="Largest estimated memory of a job (driver + workers), MB; above it a 422 "
                                 "naming `resources.workers`.")
    max_meta_tasks: int = Field(100_000_000, ge=1,
                                description="Largest iterations × meta_batch_size of a job; above it a 422 "
                                            "naming `iterations`.")
    max_job_pflop: float = Field(1000.0, gt=0,
                                 description="Largest estimated training work of a job, PFLOP; above it a 422 "
                                             "naming `iterations`.")
    max_env_steps: int = Field(10_000_000_000, ge=0,
                               description="Largest estimated environment steps of a meta-RL job "
                                           "(iterations × the steps of one iteration); above it a "
                                           "422 naming `iterations`. 0: no cap.")
    max_runtime_s: int = Field(7 * 86400, ge=1,
                               description="Seconds an attempt of a job may run (the default "
                                           "and the cap of a spec's max_runtime_s).")
    gpu_resource: str = Field(
        "GPU", pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$",
        description="Ray resource that `gpus_per_worker` asks for: GPU, or a custom resource "
                    "standing in for GPUs (e.g. gpu_slot).")
    cluster_autoscaling: bool = Field(
        False, description="The Ray cluster autoscales (KubeRay, the Ray autoscaler): a job is not "
                           "refused against the cluster's current totals; its driver and its "
                           "workers' placement group stay pending (the job's progress says it "
                           "waits for placement) so the autoscaler sees the demand, for up to "
                           "placement_pending_timeout_s. Off: a job larger than the cluster waits "
                           "queued at once, and placement gives up after 60 s.")
    placement_pending_timeout_s: float = Field(
        900.0, gt=0, le=86_400,
        description="With cluster_autoscaling: seconds a job's driver or its workers' placement "
                    "group may stay pending (long enough for a node to boot) before the job "
                    "fails, saying what it waited for.")

    # Artifact store (metaserve.workers.object_store): artifacts and checkpoints on a local directory,
    # or on S3-compatible object storage that every host reaches.
    artifact_root: str = Field(
        ".metaserve/artifacts",
        description="Where job artifacts and checkpoints are stored: a directory, or "
                    "s3://bucket/prefix on object storage every host reaches (a cluster needs the latter). "
                    "serve/dispatcher refuse to start, and /readyz answers 503, while the store "
                    "does not answer.")
    s3_endpoint_url: str = Field("", description="S3 endpoint of an s3:// artifact root "
                                 "(MinIO, Ceph, ...), e.g. http://artifacts:9000; empty: AWS.")
    s3_access_key_id: str = Field("", description="S3 access key id; empty: the environment's "
                                  "or instance's AWS credentials.")
    s3_secret_access_key: SecretStr = Field(SecretStr(""), description="S3 secret access key.")
    s3_region: str = Field("us-east-1", min_length=1, description="S3 region.")

    # Hostile-input bounds (docs/RELIABILITY.md, "Server limits"): what one client may hold of
    # the event loop, the SSE streams and the adapt pool. Header/URL/timeout limits apply to
    # `metaserve serve` (its uvicorn protocol), not to an app mounted elsewhere.
    max_header_bytes: int = Field(
        MAX_HEADER_BYTES, ge=1024, le=16 * 1024 * 1024,
        description="Largest request head (request line + headers, bytes); larger → 431.")
    max_url_bytes: int = Field(MAX_URL_BYTES, ge=256, le=1024 * 1024,
                               description="Longest request target (bytes); longer → 414.")
    header_timeout_s: float = Field(
        HEADER_TIMEOUT_S, gt=0, le=3600,
        description="Seconds a connection may take to send a complete request head; then 408.")
    body_timeout_s: float = Field(
        BODY_TIMEOUT_S, gt=0, le=3600,
        description="Seconds a request body may take beyond what its size needs at "
                    "METASERVE_BODY_MIN_BYTES_PER_S: a body not complete by then → 408, closed.")
    body_min_bytes_per_s: int = Field(
        BODY_MIN_BYTES_PER_S, ge=1,
        description="Slowest upload rate a body is given time for (bytes/s, on top of "
                    "METASERVE_BODY_TIMEOUT_S).")
    max_connections: int = Field(
        MAX_CONNECTIONS, ge=2, le=1_000_000,
        description="Open connections of `metaserve serve` (also kept 100 below its file-"
                    "descriptor limit); at the cap the connection longest waiting on its client "
                    "is closed (503) to make room, or the new one is refused (503).")
    max_connections_per_client: int = Field(
        MAX_CONNECTIONS_PER_CLIENT, ge=1, le=1_000_000,
        description="Open connections per client address (behind a proxy: all its clients); at "
                    "the cap the address's connection longest waiting on its client is closed "
                    "(503) to make room, or the new one is refused (503 with Retry-After).")
    auth_failure_limit: int = Field(
        20, ge=0, le=1_000_000,
        description="Requests answered 401 per client address within "
                    "METASERVE_AUTH_FAILURE_WINDOW_S; past it the address's new connections are "
                    "answered 429 (Retry-After: the rest of the window) before anything is read. "
                    "0: no limit (behind a proxy every client shares its address).")
    auth_failure_window_s: float = Field(
        60.0, gt=0, le=86400,
        description="Seconds of the window METASERVE_AUTH_FAILURE_LIMIT counts in.")
    key_cache_ttl_s: float = Field(
        KEY_CACHE_TTL_S, ge=0, le=3600,
        description="Seconds a server trusts an API key it looked up; a key revoked or rotated "
                    "through another process is accepted here for at most this long (open "
                    "event streams re-check sooner: METASERVE_STREAM_KEY_CHECK_S).")
    stream_key_check_s: float = Field(
        STREAM_KEY_CHECK_S, gt=0, le=60,
        description="Seconds between an open event stream's checks of its API key in the "
                    "database; a revoked or rotated-out key's streams end with a `closed` event.")
    max_event_streams_per_user: int = Field(
        MAX_EVENT_STREAMS_PER_USER, ge=1, le=100_000,
        description="Open SSE streams per user on one server; more → 429 with Retry-After.")
    adapt_concurrency: int = Field(ADAPT_CONCURRENCY, ge=1, le=256,
                                   description="Adapt calls computed at once: adapt processes, each "
                                               "started on first use and kept.")
    adapt_queue: int = Field(ADAPT_QUEUE, ge=0, le=10_000,
                             description="Adapt calls waiting for a process; more → 503.")
    adapt_timeout_s: float = Field(ADAPT_TIMEOUT_S, gt=0, le=3600,
                                   description="Seconds an adapt call may compute once a process took it; "
                                               "then 504 and that process is killed.")
    metrics_anonymous: bool = Field(
        False, description="Serve GET /metrics (Prometheus) without an API key; off: an admin "
                           "key is needed (a scraper sends it as a bearer token).")

    # Uploaded datasets (docs/DATASETS.md): each limit broken → 413/422 naming the field; a
    # raw server path in a spec is an operator's tool.
    dataset_max_upload_bytes: int = Field(
        DATASET_MAX_UPLOAD_BYTES, ge=1,
        description="Largest dataset upload (bytes, as sent); larger → 413 before it is kept.")
    dataset_max_images: int = Field(DATASET_MAX_IMAGES, ge=1,
                                    description="Most images in one dataset; more → 422.")
    dataset_max_image_side: int = Field(
        DATASET_MAX_IMAGE_SIDE, ge=8, le=8192,
        description="Largest height or width of an image of a dataset (pixels); larger → 422.")
    dataset_max_stored_bytes: int = Field(
        DATASET_MAX_STORED_BYTES, ge=1,
        description="Largest dataset once decoded (N × C × H × W bytes); larger → 422.")
    dataset_max_rows: int = Field(DATASET_MAX_ROWS, ge=1,
                                  description="Most rows in one table (CSV/Parquet); more → 422.")
    dataset_max_columns: int = Field(DATASET_MAX_COLUMNS, ge=1, le=100_000,
                                     description="Most columns in one table; more → 422.")
    dataset_convert_memory_bytes: int = Field(
        DATASET_CONVERT_MEMORY_BYTES, ge=256 * 1024**2,
        description="Address space of the process that converts an upload (RLIMIT_AS); an "
                    "upload that needs more → 422, the API process untouched.")
    dataset_convert_concurrency: int = Field(
        DATASET_CONVERT_CONCURRENCY, ge=1, le=64,
        description="Upload conversions run at once (each a child process of up to "
                    "METASERVE_DATASET_CONVERT_MEMORY_BYTES); an upload waits up to 30 s for "
                    "one, then 503.")
    dataset_convert_timeout_s: float = Field(
        DATASET_CONVERT_TIMEOUT_S, gt=0, le=24 * 3600,
        description="Seconds an upload's conversion may take; longer → 422 and it is killed.")
    dataset_max_expansion: int = Field(
        DATASET_MAX_EXPANSION, ge=1,
        description="Largest ratio of an image dataset's decoded size (N × C × H × W bytes plus "
                    "labels) to the upload's size, above 64 MiB decoded: an archive or npz that "
                    "declares more than this (a compression bomb) → 422 before it is decoded.")
    dataset_max_per_user: int = Field(
        DATASET_MAX_PER_USER, ge=0,
        description="Datasets one user may keep (admin keys are exempt); one more → 429 naming "
                    "the quota, nothing kept. 0: no cap.")
    dataset_max_bytes_per_user: int = Field(
        DATASET_MAX_BYTES_PER_USER, ge=0,
        description="Stored bytes (canonical files, as decoded) of one user's datasets (admin keys "
                    "are exempt); an upload that would pass it → 429 naming the quota, nothing "
                    "kept. 0: no cap.")
    data_root: str = Field(
        "", description="A directory under which any key's spec may name a dataset `path`; "
                        "empty: only admin keys may name paths.")

    @field_validator("artifact_root", mode="before")
    @classmethod
    def _check_artifact_root(cls, value: object) -> str:
        """A directory (a Path is fine) or a valid ``s3://bucket/prefix``; else a clear error."""
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError("METASERVE_ARTIFACT_ROOT must be a directory or an s3://bucket/prefix URL")
        if "://" not in value:
            return str(Path(value))
        if not value.startswith("s3://"):
            raise ValueError(f"METASERVE_ARTIFACT_ROOT={value!r}: only a directory or an "
                             "s3://bucket/prefix URL is supported")
        try:
            parse_s3_url(value)
        except ValueError as error:
            raise ValueError(f"METASERVE_ARTIFACT_ROOT: {error}") from None
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_s3_endpoint_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError(f"METASERVE_S3_ENDPOINT_URL={value!r}: expected http(s)://host[:port]")
        return value.rstrip("/")

    def storage_config(self) -> StorageConfig:
        """What :func:`metaserve.workers.object_store.open_store` needs (plain data for Ray actors)."""
        return StorageConfig(root=self.artifact_root, endpoint_url=self.s3_endpoint_url,
                             access_key_id=self.s3_access_key_id,
                             secret_access_key=self.s3_secret_access_key.get_secret_value(),
                             region=self.s3_region)

    @property
    def admin_key_path(self) -> Path:
        return self.data_dir / "admin.key"

    @property
    def upload_dir(self) -> Path:
        """Where dataset uploads are spooled while they are converted (removed after)."""
        return self.data_dir / "uploads"

    @property
    def dispatcher_health_path(self) -> Path:
        """Where a standalone dispatcher reports its health (``metaserve dispatcher --health``)."""
        return self.data_dir / "dispatcher-health.json"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests and ``create_app(settings=...)`` may bypass it."""
    return Settings()

