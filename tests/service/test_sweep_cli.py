"""``metaserve sweep submit|status|trials|cancel|fetch`` and the SDK's sweep methods against
the real API served by uvicorn (no dispatcher: the trials are written as a driver would)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaserve.service import child_jobs, claims, job_store
from metaserve.cli import app
from metaserve.client import Client
from metaserve.service.orm import JobStatus
from metaserve.workers.object_store import StorageConfig, open_store

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("isolated_config", "artifact_root")
SWEEP_YAML = """\
name: cli-sweep
spec:
  algorithm: {name: maml}
  task_family: {name: sine}
  iterations: 20
  evaluation: {every: 5, tasks: 10, inner_steps: [1]}
space:
  algorithm.inner_lr: {grid: [0.01, 0.1]}
search: {name: grid}
scheduler: {name: asha}
"""
TRIAL = "0" * 25 + "7"


def invoke(*args: str):  # noqa: ANN201
    return runner.invoke(app, list(args), catch_exceptions=False)


def run_one_trial(sessions, db_url: str, root: Path) -> str:  # noqa: ANN001
    """Claim the driver and record one finished trial and the sweep's artifacts, as the
    dispatcher does from the Tune driver's events; the driver job's id."""
    with sessions() as session:
        with session.begin():
            driver = claims.claim_next_job(session=session, worker_id="w", lease_s=30)
        base = job_store.job_spec(driver)
        session.commit()
        trial = base.model_copy(update={"algorithm": base.algorithm.model_copy(
            update={"inner_lr": 0.1})})
        with session.begin():
            child_jobs.start_child_job(session=session, parent_job_id=driver.id, worker_id="w",
                                  job_id=TRIAL, key="abc_00001", name="cli-sweep/abc_00001",
                                  spec=trial)
            job_store.add_metrics(session=session, job_id=TRIAL, rows=[(20, "val/loss_step1", 0.25),
                                                                    (20, "test/loss_step1", 0.375)])
            child_jobs.end_child_job(session=session, parent_job_id=driver.id, worker_id="w",
                                job_id=TRIAL, status=JobStatus.SUCCEEDED, message="finished")
    scratch = root.parent / "scratch"
    scratch.mkdir()
    for name, text in (("meta_init.safetensors", "weights"), ("meta_init.json", "{}"),
                       ("sweep.json", json.dumps({"best": {"job_id": TRIAL}}))):
        (scratch / name).write_text(text)
    files = open_store(StorageConfig(root=str(root))).put(driver.id, sorted(scratch.iterdir()))
    with sessions() as session:
        for file in files:
            with session.begin():
                job_store.add_artifact(session=session, job_id=driver.id, name=file.name, size=file.size,
                                       sha256=file.sha256, media_type=file.media_type)
    return driver.id


def test_sweep_submit_status_trials_fetch_and_cancel(logged_in, tmp_path, sessions, db_url,
                                                    artifact_root):  # noqa: ANN001, F811
    document = tmp_path / "sweep.yaml"
    document.write_text(SWEEP_YAML)
    submitted = invoke("sweep", "submit", str(document), "--set", "num_samples=2", "-q")
    assert submitted.exit_code == 0, submitted.output
    sweep_id = submitted.output.strip()
    assert sweep_id.startswith("sw_")
    status = invoke("sweep", "status", sweep_id)
    assert status.output == (f"{sweep_id}  cli-sweep  queued  trials: none started of 4\n")
    run_one_trial(sessions, db_url, artifact_root)
    status = invoke("sweep", "status", sweep_id)
    assert status.output == (f"{sweep_id}  cli-sweep  running  trials: 1 succeeded of 4; best "
                             f"val/loss_step1 0.25, held-out test/loss_step1 0.375 "
                             f"(job {TRIAL})\n")
    table = invoke("sweep", "trials", sweep_id)
    assert "abc_00001" in table.output and TRIAL in table.output and "0.25" in table.output
    assert "held-out test/loss_step1" in table.output and "0.375" in table.output
    listed = invoke("sweep", "list")
    assert listed.exit_code == 0, listed.output
    assert listed.output == status.output  # one sweep: its status line
    jobs = json.loads(invoke("list", "--output", "json").output)  # the trial under its driver
    assert [(job["name"], job["trial_count"]) for job in jobs] == [("cli-sweep (sweep driver)", 1)]
    every = json.loads(invoke("list", "--all-trials", "--output", "json").output)
    assert TRIAL in [job["id"] for job in every] and len(every) == 2
    board = json.loads(invoke("sweep", "trials", sweep_id, "--json").output)
    assert [(t["job_id"], t["config"], t["value"], t["test_value"]) for t in board] == [
        (TRIAL, {"algorithm.inner_lr": 0.1}, 0.25, 0.375)]
    fetched = invoke("sweep", "fetch", sweep_id, "--out", str(tmp_path / "best"))
    assert fetched.exit_code == 0, fetched.output
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "meta_init.json", "meta_init.safetensors", "sweep.json"]
    cancelled = invoke("sweep", "cancel", sweep_id)
    assert cancelled.exit_code == 0 and "cancelling" in cancelled.output
    missing = invoke("sweep", "status", "sw_" + "0" * 26)
    assert (missing.exit_code, missing.output) == (1, "error: Sweep not found. (404 not_found)\n")


def test_sdk_submit_sweep_and_a_422_naming_the_field(logged_in, key):  # noqa: ANN001, F811
    from metaserve.client import InvalidRequest

    with Client(url=logged_in, api_key=key) as client:
        sweep = client.submit_sweep({"spec": {"algorithm": {"name": "maml"},
                                              "task_family": {"name": "sine"}},
                                     "space": {"algorithm.inner_lr": {"choice": [0.01, 0.1]}},
                                     "num_samples": 3})
        assert (sweep["status"], sweep["config"]["trials"]) == ("queued", 3)
        assert client.sweep_trials(sweep) == []
        assert [s["id"] for s in client.sweeps()] == [sweep["id"]]
        with pytest.raises(InvalidRequest) as raised:
            client.submit_sweep({"spec": {"algorithm": {"name": "maml"},
                                          "task_family": {"name": "sine"}},
                                 "space": {"algorithm.inner_lr": {"uniform": [0.1, 0.01]}}})
    assert [d["field"] for d in raised.value.details] == ["space.algorithm.inner_lr"]
