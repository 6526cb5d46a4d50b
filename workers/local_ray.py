"""A local Ray for one machine (the embedded server, ``metaserve train``) that listens on
127.0.0.1 only, on ports of the system's choosing."""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"
# Ray 2.60 reads it once, at import (ray._private.ray_constants.ENABLE_RAY_CLUSTER).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The Prometheus servers of the autoscaler monitor and the dashboard head: fixed ports (44217,
# 44227) by default, so a second Ray on the host went without them; 0 = any free port.
METRICS_PORT_ENVS = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")


def loopback_only_ray() -> None:
    """Make the local Ray that ``ray.init()`` starts listen on 127.0.0.1 only.

    Ray 2.60 binds every server of a node (GCS, raylet, object manager, core workers, the
    dashboard and runtime-env agents, the metrics servers of the autoscaler monitor and the
    dashboard head) to the node's IP, and ``ray.init(_node_ip_address="127.0.0.1")`` alone does
    not help: ``ray.init`` replaces a loopback ``_node_ip_address`` with this host's outward IP
    (``services.resolve_ip_for_localhost``), and the gRPC servers of a node on an outward IP
    listen on all addresses (``*``). It keeps the loopback address only where Ray clusters are
    off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once when Ray is imported; the
    Windows/macOS default): then the node's IP is 127.0.0.1 and every server, also those of
    the processes Ray starts, listens on 127.0.0.1 (the gRPC ones on ``[::ffff:127.0.0.1]``).
    ``tests/reliability/test_embedded_ray_ports.py`` checks each listener with ``ss``.
    Only for a Ray of one machine: a node that joins a cluster needs a reachable IP.
    """
    from ray._private import ray_constants

    os.environ[LOCAL_ONLY_ENV] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported Ray already
    for name in METRICS_PORT_ENVS:
        os.environ.setdefault(name, "0")


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init(**init_kwargs)`` of a new local Ray, loopback only, without the dashboard."""
    import ray

    loopback_only_ray()
    ray.init(include_dashboard=False, _node_ip_address=LOOPBACK, **init_kwargs)
