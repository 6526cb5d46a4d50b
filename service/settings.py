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

from metaserve.workers.storage import StorageConfig, parse_s3_url

LEASE_S = 30.0
HEARTBEAT_S = 5.0
MAX_BODY_BYTES = 1024 * 1024
DRIVER_MEMORY_MB = 1024


class Settings(BaseSettings):
    """Every server setting; each one is read from ``METASERVE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="METASERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP server listens on.")
    database_url: str = Field(
        "sqlite:///./.metaserve/metaserve.db",
        description="SQLAlchemy URL; SQLite runs in WAL mode, PostgreSQL via psycopg.",
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
    lease_s: float = Field(LEASE_S, gt=0, description="Job lease length in seconds.")
    heartbeat_s: float = Field(HEARTBEAT_S, gt=0,
                               description="Seconds between lease renewals of a running job.")

    # Where a job's driver and workers are placed on Ray.
    driver_memory_mb: int = Field(
        DRIVER_MEMORY_MB, ge=64, le=1024 * 1024,
        description="Ray `memory` request of each job's driver (its supervisor actor), MB.")
    gpu_resource: str = Field(
        "GPU", pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$",
        description="Ray resource that `gpus_per_worker` asks for: GPU, or a custom resource "
                    "standing in for GPUs (e.g. gpu_slot).")

    # Artifact store (metaserve.workers.storage): artifacts and checkpoints on a local directory,
    # or on S3-compatible object storage that every host reaches.
    artifact_root: str = Field(
        ".metaserve/artifacts",
        description="Where job artifacts and checkpoints are stored: a directory, or "
                    "s3://bucket/prefix on object storage every host reaches.")
    s3_endpoint_url: str = Field("", description="S3 endpoint of an s3:// artifact root "
                                 "(MinIO, Ceph, ...), e.g. http://artifacts:9000; empty: AWS.")
    s3_access_key_id: str = Field("", description="S3 access key id; empty: the environment's "
                                  "or instance's AWS credentials.")
    s3_secret_access_key: SecretStr = Field(SecretStr(""), description="S3 secret access key.")
    s3_region: str = Field("us-east-1", min_length=1, description="S3 region.")

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
        """What :func:`metaserve.workers.storage.open_store` needs (plain data for Ray actors)."""
        return StorageConfig(root=self.artifact_root, endpoint_url=self.s3_endpoint_url,
                             access_key_id=self.s3_access_key_id,
                             secret_access_key=self.s3_secret_access_key.get_secret_value(),
                             region=self.s3_region)

    @property
    def admin_key_path(self) -> Path:
        return self.data_dir / "admin.key"

    @property
    def dispatcher_health_path(self) -> Path:
        """Where a standalone dispatcher reports its health (``metaserve dispatcher --health``)."""
        return self.data_dir / "dispatcher-health.json"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests and ``create_app(settings=...)`` may bypass it."""
    return Settings()


def __getattr__(name: str) -> Settings:
    """``settings``, the singleton, is built on first use: a bad variable then fails where a
    command reads it (one line), not on import."""
    if name == "settings":
        return get_settings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
