"""Settings of the metaserve server: one pydantic-settings class, environment prefix ``METASERVE_``.

Clients (the CLI's HTTP commands, the SDK, curl walkthroughs) read ``METASERVE_URL`` and
``METASERVE_API_KEY`` instead; those are not server settings.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    artifact_root: Path = Field(Path("./.metaserve/artifacts"),
                                description="Where job artifacts are stored.")
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

    @property
    def admin_key_path(self) -> Path:
        return self.data_dir / "admin.key"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests and ``create_app(settings=...)`` may bypass it."""
    return Settings()


settings = get_settings()
