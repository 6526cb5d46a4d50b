"""How a server-side process joins the Ray cluster (used by the dispatcher only, which is the
only server-side code that talks to Ray).

``METASERVE_RAY_ADDRESS`` decides:

- empty: start a local Ray (the embedded default);
- ``host:port`` (the GCS of a cluster's head): this host joins the cluster as a Ray node with
  no CPUs, no GPUs and no ``memory`` (``ray start --address=... --num-cpus=0 --num-gpus=0
  --memory=0``) unless a node of that cluster already runs here, then connects through it.
  A Ray driver needs a raylet on its own host (Ray 2.60 refuses a driver without one: "No node
  info found"); a node without resources runs nothing the scheduler places: neither inner-loop
  workers nor job drivers (their supervisor actors ask for ``memory``), which go to the
  worker nodes;
- ``ray://host:10001``: Ray Client (kept for setups that cannot run a node on the dispatcher's
  host; measured slower and Ray Client is in maintenance mode, see docs/DEPLOY.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from metaserve.service.settings import Settings
from metaserve.workers.local_ray import start_local_ray

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 120.0


def node_join_command(address: str) -> list[str]:
    """``ray start`` joining ``address`` as a node that the scheduler never places work on."""
    return [ray_executable(), "start", f"--address={address}", "--num-cpus=0", "--num-gpus=0",
            "--memory=0", "--disable-usage-stats"]


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def join_cluster(address: str) -> None:
    """Start a resource-less Ray node on this host, joined to the cluster at ``address``."""
    command = node_join_command(address)
    logger.info("starting a Ray node without resources on this host",
                extra={"ray_address": address, "command": " ".join(command)})
    result = subprocess.run(command, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"`ray start --address={address}` failed (exit {result.returncode}): "
                           + (lines[-1] if lines else "no output"))


def local_node_running() -> bool:
    """Whether a raylet runs on this host: how ``ray.init(address=...)`` finds the node a driver
    attaches to (it scans the process table; without one it waits a minute, then fails with
    "No node info found")."""
    from ray._private import services

    return bool(services.find_node_ids())


def connect_ray(settings: Settings) -> None:
    """Connect to ``settings.ray_address`` (see the module docstring)."""
    import ray

    if ray.is_initialized():
        return
    if settings.ray_auth_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ["RAY_AUTH_TOKEN"] = settings.ray_auth_token
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING)
    # Modules the workers import travel with the job, also to a cluster's nodes.
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    address = settings.ray_address
    if not address:
        start_local_ray(runtime_env=runtime_env, num_cpus=settings.ray_num_cpus or None, **kwargs)
    elif address.startswith("ray://"):
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    else:
        if not local_node_running():
            join_cluster(address)
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    logger.info("connected to Ray", extra={"resources": ray.cluster_resources()})


RAY_PROBE_TIMEOUT_S = 2.0


def ray_connection_alive(timeout_s: float = RAY_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether this process's Ray connection works now: the GCS answers within ``timeout_s``
    and says this process's node is alive (what the dispatcher's health check reports;
    ``ray.is_initialized()`` stays true while the head is gone). Ray Client connections
    (``ray://``) report whether the client is still connected."""
    import ray

    if not ray.is_initialized():
        return False, "not connected to Ray"
    if ray.util.client.ray.is_connected():
        return True, "connected (Ray Client)"
    from ray._raylet import NodeID

    worker = ray._private.worker.global_worker
    node_id = ray.get_runtime_context().get_node_id()
    try:
        alive = worker.gcs_client.check_alive([NodeID.from_hex(node_id)], timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - GCS unreachable, timed out
        return False, f"the Ray head (GCS) does not answer: {type(error).__name__}"
    if not alive or not alive[0]:
        return False, f"the Ray head reports this host's node {node_id[:12]} dead"
    return True, "connected"
