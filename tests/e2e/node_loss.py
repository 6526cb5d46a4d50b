"""Run a job on a 3-node Ray cluster (``ray.cluster_utils.Cluster``), remove the node of one
inner-loop worker mid-job, and print the outcome as JSON. Run by test_node_loss.py in a process
of its own, since a test session shares one Ray instance."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster
from safetensors.torch import load_file

from metaserve.workers.engine.loop import RunHooks
from metaserve.workers import registry
from metaserve.workers.spec import JobSpec


def run_job(spec: dict, *args, **kwargs) -> dict:  # noqa: ANN002, ANN003
    """:func:`metaserve.workers.registry.run_job` of a spec written here as a document (this
    file's edge: parsed once, as the API and the CLI do)."""
    return registry.run_job(JobSpec.model_validate(spec), *args, **kwargs)


SPEC = {
    "algorithm": {"name": "maml"},
    "task_family": {"name": "sine"},
    "meta_batch_size": 8,
    "iterations": 60,
    "log_every": 5,
    "checkpoint_every": 20,
    "evaluation": {"every": 0, "tasks": 20, "inner_steps": [1]},
    "resources": {"workers": 2, "cpus_per_worker": 1},
}


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers_nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out = Path(tempfile.mkdtemp())
    try:
        run_job(SPEC, out / "undisturbed")
        placements: list[list[dict]] = []
        removed: list[str] = []

        def remove_a_workers_node(step: int, metrics: dict) -> None:
            if step == 20 and not removed:
                victim = placements[-1][0]["node"]
                node = next(n for n in workers_nodes if n.node_id == victim)
                cluster.remove_node(node)
                removed.append(victim)

        run_job(SPEC, out / "disturbed",
                RunHooks(report=remove_a_workers_node, workers_ready=placements.append))
        before = load_file(out / "undisturbed" / "meta_init.safetensors")
        after = load_file(out / "disturbed" / "meta_init.safetensors")
        print(json.dumps({
            "removed_node": removed[0] if removed else None,
            "placements": [[w["node"] for w in ws] for ws in placements],
            "identical": sorted(before) == sorted(after)
            and all(torch.equal(before[k], after[k]) for k in before),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
