"""How a server-side process joins the Ray cluster (used by the dispatcher only, which is the
only server-side code that talks to Ray)."""

from __future__ import annotations

import logging
import os
from typing import Any

from metaserve.service.settings import Settings

logger = logging.getLogger(__name__)


def connect_ray(settings: Settings) -> None:
    """Connect to ``settings.ray_address``, or start a local Ray when it is empty."""
    import ray

    if ray.is_initialized():
        return
    if settings.ray_auth_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ["RAY_AUTH_TOKEN"] = settings.ray_auth_token
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING)
    # Modules the workers import travel with the job, also to a cluster's nodes.
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if settings.ray_address:
        ray.init(address=settings.ray_address, runtime_env=runtime_env, **kwargs)
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env,
                 num_cpus=settings.ray_num_cpus or None, **kwargs)
    logger.info("connected to Ray", extra={"resources": ray.cluster_resources()})
