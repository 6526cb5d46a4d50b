"""The dispatcher against a real database (SQLite and PostgreSQL) and the session's real Ray."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlalchemy import select

from metaserve.service import artifacts, jobs
from metaserve.service.dispatcher import Dispatcher
from metaserve.service.models import Job, JobStatus, Metric
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec

pytestmark = pytest.mark.usefixtures("ray_session")

SHORT_SINE = {
    "algorithm": {"name": "maml"},
    "task_family": {"name": "sine"},
    "meta_batch_size": 5,
    "iterations": 30,
    "log_every": 5,
    "checkpoint_every": 10,
    "evaluation": {"every": 0, "tasks": 20, "inner_steps": [1]},
}


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(database_url=db_url, artifact_root=tmp_path / "artifacts",
                    data_dir=tmp_path, dispatcher_concurrency=2)


@pytest.fixture
def dispatcher(settings: Settings, sessions):  # noqa: ANN001
    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    yield dispatcher
    dispatcher.stop()


def submit(sessions, owner, **spec) -> str:  # noqa: ANN001
    with sessions() as session:
        job, _ = jobs.submit_job(session=session, owner=owner,
                                 spec=JobSpec.model_validate({**SHORT_SINE, **spec}))
        return job.id


def wait_for(sessions, job_id: str, statuses: set[str], timeout: float = 120.0) -> Job:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            job = session.get(Job, job_id)
            session.expunge(job)
        if job.status in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def test_a_job_runs_to_success_with_metrics_progress_and_artifacts(dispatcher, sessions, alice,
                                                                   settings):  # noqa: ANN001
    job_id = submit(sessions, alice)
    job = wait_for(sessions, job_id, {"succeeded", "failed"})
    assert (job.status, job.attempt, job.error) == ("succeeded", 1, None)
    assert job.progress["iteration"] == job.progress["total"] == 30
    assert job.progress["workers"] == 1
    with sessions() as session:
        steps = session.scalars(select(Metric.step).where(
            Metric.job_id == job_id, Metric.name == "train/loss_after").order_by(Metric.step)).all()
        records = {a.name: a for a in jobs.list_artifacts(session=session, job_id=job_id)}
    assert steps == [5, 10, 15, 20, 25, 30]
    assert {"meta_init.safetensors", "meta_init.json", "checkpoint.safetensors",
            "checkpoint.json"} <= set(records)
    meta_init = artifacts.job_dir(settings.artifact_root, job_id) / "meta_init.safetensors"
    assert records["meta_init.safetensors"].sha256 == artifacts.describe(meta_init).sha256
    shapes = {name: tuple(t.shape) for name, t in load_file(meta_init).items()}
    assert shapes == {"layers.0.weight": (40, 1), "layers.0.bias": (40,),
                      "layers.1.weight": (40, 40), "layers.1.bias": (40,),
                      "head.weight": (1, 40), "head.bias": (1,)}


def test_a_job_with_a_missing_dataset_fails_readably_and_disturbs_nothing(dispatcher, sessions,
                                                                          alice, tmp_path):  # noqa: ANN001
    missing = tmp_path / "no-such-dataset"
    bad = submit(sessions, alice, task_family={"name": "images", "path": str(missing)},
                 max_attempts=2)
    good = submit(sessions, alice)
    bad_job = wait_for(sessions, bad, {"failed", "succeeded"})
    good_job = wait_for(sessions, good, {"failed", "succeeded"})
    assert bad_job.status == "failed"
    assert bad_job.attempt == 2
    assert str(missing) in bad_job.error and "does not exist" in bad_job.error
    assert good_job.status == "succeeded"


def test_cancelling_a_running_job_stops_it_within_five_seconds(dispatcher, sessions, alice,
                                                               settings):  # noqa: ANN001
    job_id = submit(sessions, alice, iterations=1_000_000, checkpoint_every=20)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = wait_for(sessions, job_id, {"running"})
        if job.progress.get("iteration", 0) >= 20:
            break
        time.sleep(0.2)
    with sessions() as session:
        jobs.request_cancel(session=session, job_id=job_id, owner=alice)
    asked = time.monotonic()
    job = wait_for(sessions, job_id, {"cancelled", "failed", "succeeded"}, timeout=10)
    assert job.status == "cancelled"
    assert time.monotonic() - asked < 5.0
    checkpoint = artifacts.job_dir(settings.artifact_root, job_id) / "checkpoint"
    assert (checkpoint / "checkpoint.safetensors").exists()


def test_a_job_asking_for_more_gpus_than_the_cluster_has_stays_queued_with_a_reason(
        dispatcher, sessions, alice):  # noqa: ANN001
    job_id = submit(sessions, alice, resources={"workers": 1, "gpus_per_worker": 2})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = wait_for(sessions, job_id, {"queued"})
        if job.message:
            break
        time.sleep(0.2)
    assert job.status == "queued"
    assert job.attempt == 0
    assert job.message == ("waiting for resources: 2 GPU(s) asked (1 workers × 2), "
                           "cluster has 0")
    other = submit(sessions, alice)  # the unplaceable job does not block the queue
    assert wait_for(sessions, other, {"succeeded", "failed"}).status == "succeeded"
    assert wait_for(sessions, job_id, {"queued"}).status == "queued"


def test_a_restarted_embedded_dispatcher_takes_back_its_own_jobs_at_once(settings, sessions,
                                                                         alice):  # noqa: ANN001
    with sessions() as session:
        job_id = submit(sessions, alice)
        jobs.claim_next_job(session=session, worker_id="embedded:me", lease_s=3600)
    restarted = Dispatcher(settings, sessions, worker_id="embedded:me")
    restarted.start()
    try:
        job = wait_for(sessions, job_id, {"succeeded", "failed"})
    finally:
        restarted.stop()
    assert (job.status, job.attempt) == ("succeeded", 2)
