"""A queued job says what it waits for: the real ``metaserve serve`` on its embedded default
(SQLite, the embedded dispatcher with its two slots, a local Ray), two long jobs holding both
slots, a third job's ``message`` naming the slots and the setting that sets them."""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers import SHORT_SINE
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.ray]

LONG_SINE = {**SHORT_SINE, "iterations": 100_000, "checkpoint_every": 100_000}
START_TIMEOUT_S = 240.0


@pytest.fixture
def server(tmp_path):  # noqa: ANN001
    server = ServerProcess(tmp_path).start()  # the default: 2 slots (DISPATCHER_CONCURRENCY)
    try:
        yield server
    finally:
        assert server.terminate(timeout=60) in (0, -signal.SIGTERM)


def test_a_third_job_waiting_behind_two_running_ones_says_it_waits_for_a_slot(server):
    with server.client() as client:
        holding = [client.post("/v1/jobs", json=LONG_SINE).json()["id"] for _ in range(2)]
        deadline = time.monotonic() + START_TIMEOUT_S
        while [client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in holding] != [
                "running", "running"]:
            assert time.monotonic() < deadline, "the two jobs did not start"
            time.sleep(0.5)
        third = client.post("/v1/jobs", json=LONG_SINE).json()["id"]
        expected = ("waiting for a slot: 2 of 2 running on the embedded dispatcher "
                    "(METASERVE_DISPATCHER_CONCURRENCY)")
        shown = client.get(f"/v1/jobs/{third}").json()
        assert (shown["status"], shown["message"]) == ("queued", expected)
        listed = {job["id"]: job for job in client.get("/v1/jobs").json()["data"]}
        assert listed[third]["message"] == expected
        assert all(listed[job_id]["started_at"] and listed[job_id]["duration_s"] >= 0
                   for job_id in holding)
        for job_id in (third, *holding):
            client.post(f"/v1/jobs/{job_id}/cancel")
