"""End to end: the real ``metaserve serve`` on its embedded default (SQLite, local Ray it
starts itself) runs jobs, survives being SIGKILLed, and hands out loadable artifacts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import load, load_file

from tests.helpers import RESUMABLE_SINE, assert_same_bits_as_undisturbed, wait_for_iteration
from tests.helpers import wait_for_http_status as wait_for_status
from tests.server_process import ServerProcess

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}

pytestmark = pytest.mark.slow


def test_the_two_line_job_runs_to_success_and_its_meta_init_downloads(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        with server.client() as client:
            job = client.post("/v1/jobs", json=TWO_LINE_SPEC).json()
            seen = {job["status"]}
            deadline = time.monotonic() + 300
            while job["status"] not in {"succeeded", "failed"} and time.monotonic() < deadline:
                time.sleep(0.1)
                job = client.get(f"/v1/jobs/{job['id']}").json()
                seen.add(job["status"])
            assert job["status"] == "succeeded", job
            assert {"running", "succeeded"} <= seen
            assert client.get("/readyz").json() == {"status": "ok", "dispatcher": "ready"}
            listed = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
            download = client.get(f"/v1/jobs/{job['id']}/artifacts/meta_init.safetensors")
            assert download.status_code == 200
            assert len(download.content) == listed["meta_init.safetensors"]["size"]
            target = tmp_path / "meta_init.safetensors"
            target.write_bytes(download.content)
            params = load_file(target)
            assert set(params) == {"layers.0.weight", "layers.0.bias", "layers.1.weight",
                                   "layers.1.bias", "head.weight", "head.bias"}
            recipe = client.get(f"/v1/jobs/{job['id']}/artifacts/meta_init.json").json()
            assert recipe["recipe"]["algorithm"] == "maml"
    finally:
        server.terminate()


def test_a_sigkilled_server_resumes_its_job_from_the_checkpoint_with_identical_bits(
        tmp_path: Path) -> None:
    spec = RESUMABLE_SINE
    server = ServerProcess(tmp_path).start()
    try:  # killed in every case: a failed wait below left the server running (an orphan)
        with server.client() as client:
            job_id = client.post("/v1/jobs", json=spec).json()["id"]
            job = wait_for_iteration(client, job_id, 70)
        assert job["status"] == "running" and job["progress"]["iteration"] < 240, job
    finally:
        server.kill()

    restarted = ServerProcess(tmp_path, port=server.port).start()
    try:
        with restarted.client() as client:
            job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=300)
            assert (job["status"], job["attempt"]) == ("succeeded", 1), job  # an interruption
            steps = [m["step"] for m in client.get(
                f"/v1/jobs/{job_id}/metrics", params={"name": "train/loss_after"}).json()["data"]]
            assert steps == list(range(10, 241, 10))
            evaluations = [m["step"] for m in client.get(
                f"/v1/jobs/{job_id}/metrics", params={"name": "val/loss_step1"}).json()["data"]]
            assert evaluations == [100, 200, 240]  # 240: the final evaluation
            served = load(client.get(
                f"/v1/jobs/{job_id}/artifacts/meta_init.safetensors").content)
    finally:
        restarted.terminate()
    assert_same_bits_as_undisturbed(spec, served, tmp_path / "undisturbed")
