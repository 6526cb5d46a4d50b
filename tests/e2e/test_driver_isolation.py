"""No training in the API process: ``metaserve serve`` runs a job on a network near the
parameter cap, and the server process's resident memory does not grow with it (the job's
driver is a Ray actor of its own, see metaserve.workers.supervisor)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from metaserve.service.settings import Settings
from metaserve.workers.cost import estimate
from metaserve.workers.spec import JobSpec
from tests.helpers import wait_for_http_status as wait_for_status
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow

# 4 hidden layers of 2,048: 12.6 M parameters (the default cap is 20 M); its driver holds
# parameters, its state and their copies in transit, ~800 MB beyond the process itself.
BIG_MLP = {
    "algorithm": {"name": "maml", "first_order": True},
    "task_family": {"name": "sine"},
    "model": {"name": "mlp", "hidden": [2048] * 4},
    "meta_batch_size": 2,
    "iterations": 3,
    "log_every": 1,
    "checkpoint_every": 1,
    "evaluation": {"every": 0, "tasks": 4, "inner_steps": [1]},
}
SMALL = {**BIG_MLP, "model": {"name": "mlp", "hidden": [40, 40]}}
GROWTH_LIMIT_BYTES = 100 * 2**20


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_a_job_near_the_parameter_cap_leaves_the_server_memory_flat(tmp_path: Path) -> None:
    parameters = estimate(JobSpec.model_validate(BIG_MLP)).parameters
    assert 10_000_000 < parameters <= Settings().max_parameters
    server = ServerProcess(tmp_path).start()
    try:
        with server.client() as client:
            deadline = time.monotonic() + 120
            while client.get("/readyz").json().get("dispatcher") != "ready":
                assert time.monotonic() < deadline, "the dispatcher did not connect to Ray"
                time.sleep(0.5)
            # A first small job warms what any first job loads once (code paths, statement
            # caches, Ray's handles); what is measured is what the big job adds.
            warm_up = client.post("/v1/jobs", json=SMALL).json()["id"]
            assert wait_for_status(client, warm_up, {"succeeded", "failed"},
                                   timeout=300)["status"] == "succeeded"
            before = resident_bytes(server.process.pid)
            job_id = client.post("/v1/jobs", json=BIG_MLP).json()["id"]
            job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=300)
            assert job["status"] == "succeeded", (job["error"], job["message"])
            after = resident_bytes(server.process.pid)
            driver = job["progress"]["placement"]["driver"]
    finally:
        server.terminate()
    assert driver["pid"] != server.process.pid
    print(f"\nmetaserve serve RSS: {before / 2**20:.0f} MiB before the {parameters:,}-parameter "
          f"job, {after / 2**20:.0f} MiB after ({(after - before) / 2**20:+.0f} MiB)")
    assert after - before < GROWTH_LIMIT_BYTES, (before, after)
