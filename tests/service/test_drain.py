"""SIGTERM drains: ``metaserve serve`` on its embedded default (SQLite, its own local Ray),
SIGTERMed while a job runs, hands the job back (queued, ``interruptions`` 1, the attempt not
counted) and exits within its grace; restarted, it finishes the job on attempt 1 with final
parameters bit-identical to an undisturbed run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import load
from sqlalchemy import select

from metaserve.service.db import make_engine, session_factory
from metaserve.service.orm import Job, JobLogLine
from tests.helpers import (RESUMABLE_SINE, assert_same_bits_as_undisturbed, wait_for_iteration,
                           wait_until)
from tests.helpers import wait_for_http_status as wait_for_status
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.server]

GRACE_S = 20


def test_a_sigtermed_server_hands_its_job_back_and_the_restart_finishes_it_on_attempt_1(
        tmp_path: Path) -> None:
    spec = RESUMABLE_SINE
    server = ServerProcess(tmp_path, METASERVE_DRAIN_GRACE_S=str(GRACE_S)).start()
    try:
        with server.client() as client:
            wait_until(lambda: client.get("/readyz").json().get("dispatcher") == "ready", 300,
                       "the embedded dispatcher connected to its Ray")
            job_id = client.post("/v1/jobs", json=spec).json()["id"]
            job = wait_for_iteration(client, job_id, 70)
        assert job["status"] == "running" and job["progress"]["iteration"] < 240, job
        signalled = time.monotonic()
        server.terminate(timeout=GRACE_S + 30)
        stopped_in = time.monotonic() - signalled
    finally:
        server.kill()
    engine = make_engine(f"sqlite:///{tmp_path / '.metaserve' / 'metaserve.db'}")
    try:
        with session_factory(engine)() as session:
            handed = session.scalars(select(Job).where(Job.id == job_id)).one()
            lines = session.scalars(select(JobLogLine.message).where(
                JobLogLine.job_id == job_id)).all()
    finally:
        engine.dispose()
    # handed back, not left to a lapsing lease: queued, attempt not counted, one interruption
    log = [line for line in server.log_path.read_text().splitlines() if "GET /v1" not in line]
    assert (handed.status, handed.attempt, handed.interruptions, handed.lease_owner) == (
        "queued", 0, 1, None), (handed.message, stopped_in, "\n".join(log[-60:]))
    assert handed.message.startswith("handed back"), handed.message
    assert any("attempt 1 interrupted" in line for line in lines), lines
    assert stopped_in < GRACE_S + 15, stopped_in  # uvicorn's own shutdown, then the drain

    restarted = ServerProcess(tmp_path, port=server.port).start()
    try:
        with restarted.client() as client:
            job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=300)
            assert (job["status"], job["attempt"], job["interruptions"]) == ("succeeded", 1, 1), (
                job, restarted.log_path.read_text()[-3000:])
            steps = [m["step"] for m in client.get(
                f"/v1/jobs/{job_id}/metrics", params={"name": "train/loss_after"}).json()["data"]]
            assert steps == list(range(10, 241, 10))
            served = load(client.get(
                f"/v1/jobs/{job_id}/artifacts/meta_init.safetensors").content)
    finally:
        restarted.terminate()
    assert_same_bits_as_undisturbed(spec, served, tmp_path / "undisturbed")
