"""Placement scenarios on a Ray cluster of their own (run as ``python -m
tests.workers.placement_scenarios <name> <out.json>`` by tests/workers/test_placement.py, so
the cluster's fake resources do not touch the session's shared Ray). Each prints nothing and
writes what it observed as JSON.

- ``gang``: one node with room for 3 workers (``gpu_slot`` = 3, the GPU stand-in); two jobs of
  2 workers each start at once. Expected: one trains, the other waits holding nothing (the
  free ``gpu_slot`` stays 1 while it waits), then trains; both finish.
- ``scale_up``: an autoscaling cluster whose only node has no ``gpu_slot``; a job asking for 2
  is not vetoed but waits for placement; a node with 2 ``gpu_slot`` joins (what an autoscaler
  does) and the job trains to the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

JOB = {
    "algorithm": {"name": "maml"},
    "task_family": {"name": "sine"},
    "meta_batch_size": 4,
    # Long enough that the job behind it waits past PENDING_REPORT_S (5 s) on an idle machine
    # (40 iterations ended in under 5 s there: the second job never said it waited).
    "iterations": 600,
    "log_every": 50,
    "checkpoint_every": 300,
    "evaluation": {"every": 0, "tasks": 4, "inner_steps": [1]},
    "resources": {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1},
}
DEADLINE_S = 240.0


def _run(name: str, options, record: dict, scratch: Path) -> None:  # noqa: ANN001
    from metaserve.workers import registry
    from metaserve.workers.engine.loop import RunHooks
    from metaserve.workers.spec import JobSpec

    events = record.setdefault(name, {"waiting": [], "ready": None, "ended": None, "error": None})

    def progress(payload: dict) -> None:
        if "waiting" in payload:
            events["waiting"].append({"time": time.time(), "text": payload["waiting"]})

    def ready(workers: list[dict]) -> None:
        if workers and events["ready"] is None:
            events["ready"] = time.time()

    try:
        registry.run_job(JobSpec.model_validate(JOB), scratch / name,
                         RunHooks(progress=progress, workers_ready=ready), options)
    except BaseException as error:  # noqa: BLE001 - reported in the JSON
        events["error"] = f"{type(error).__name__}: {error}"
    events["ended"] = time.time()


def gang(out: Path) -> None:
    import ray

    from metaserve.workers.runner import RunOptions

    ray.init(address="local", num_cpus=4, resources={"gpu_slot": 3}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    options = RunOptions(gpu_resource="gpu_slot")
    record: dict = {"free_gpu_slot_while_waiting": []}
    scratch = Path(tempfile.mkdtemp(prefix="placement-gang-"))
    threads = [threading.Thread(target=_run, args=(name, options, record, scratch)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + DEADLINE_S
    while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
        jobs = [record.get(name, {}) for name in ("a", "b")]
        if any(job.get("waiting") and job.get("ready") is None for job in jobs):
            record["free_gpu_slot_while_waiting"].append(ray.available_resources().get("gpu_slot", 0.0))
        time.sleep(0.5)
    record["deadlocked"] = any(thread.is_alive() for thread in threads)
    out.write_text(json.dumps(record))
    ray.shutdown()


def scale_up(out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from metaserve.workers.runner import RunOptions

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        options = RunOptions(gpu_resource="gpu_slot", autoscaling=True, pending_timeout_s=DEADLINE_S)
        record: dict = {}
        scratch = Path(tempfile.mkdtemp(prefix="placement-scale-"))
        thread = threading.Thread(target=_run, args=("a", options, record, scratch))
        thread.start()
        deadline = time.monotonic() + 60
        while not record.get("a", {}).get("waiting") and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        record["node_added"] = time.time()
        cluster.add_node(num_cpus=2, resources={"gpu_slot": 2})
        thread.join(DEADLINE_S)
        record["deadlocked"] = thread.is_alive()
        out.write_text(json.dumps(record))
        ray.shutdown()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    {"gang": gang, "scale_up": scale_up}[sys.argv[1]](Path(sys.argv[2]))
