"""The dispatcher against a real database (SQLite and PostgreSQL) and the session's real Ray."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from safetensors.torch import load_file
from sqlalchemy import select, update

from metaserve.service import artifacts, claims, job_store
from metaserve.service.dispatcher import Dispatcher
from metaserve.service.orm import Job, Metric
from tests.helpers import submit_short_sine as submit
from tests.helpers import reread, wait_until
from tests.helpers import wait_for_job as wait_for

# Claims by several dispatchers: the SQL differs between the dialects.
pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.dialects]


def test_a_job_runs_to_success_with_metrics_progress_and_artifacts(dispatcher, sessions, alice,
                                                                   settings, tmp_path):  # noqa: ANN001
    job_id = submit(sessions, alice)
    job = wait_for(sessions, job_id, {"succeeded", "failed"})
    assert (job.status, job.attempt, job.error) == ("succeeded", 1, None)
    assert job.progress["iteration"] == job.progress["total"] == 30
    assert job.progress["workers"] == 1
    with sessions() as session:
        steps = session.scalars(select(Metric.step).where(
            Metric.job_id == job_id, Metric.name == "train/loss_after").order_by(Metric.step)).all()
        records = {a.name: a for a in job_store.list_artifacts(session=session, job_id=job_id)}
    assert steps == [5, 10, 15, 20, 25, 30]
    assert {"meta_init.safetensors", "meta_init.json", "checkpoint.safetensors",
            "checkpoint.json"} <= set(records)
    _, chunks = artifacts.get_store(settings.storage_config()).open(job_id, "meta_init.safetensors")
    meta_init = tmp_path / "meta_init.safetensors"  # attempt 1's, as the job's manifest names it
    meta_init.write_bytes(b"".join(chunks))
    assert records["meta_init.safetensors"].sha256 == artifacts.describe(meta_init).sha256
    shapes = {name: tuple(t.shape) for name, t in load_file(meta_init).items()}
    assert shapes == {"layers.0.weight": (40, 1), "layers.0.bias": (40,),
                      "layers.1.weight": (40, 40), "layers.1.bias": (40,),
                      "head.weight": (1, 40), "head.bias": (1,)}


def test_a_job_with_a_missing_dataset_fails_on_its_first_attempt_and_disturbs_nothing(
        dispatcher, sessions, alice, tmp_path):  # noqa: ANN001
    missing = tmp_path / "no-such-dataset"
    bad = submit(sessions, alice, task_family={"name": "images", "path": str(missing)},
                 max_attempts=3)
    good = submit(sessions, alice)
    bad_job = wait_for(sessions, bad, {"failed", "succeeded"})
    good_job = wait_for(sessions, good, {"failed", "succeeded"})
    assert (bad_job.status, bad_job.attempt) == ("failed", 1)
    assert str(missing) in bad_job.error and "does not exist" in bad_job.error
    assert "\n" not in bad_job.error and "Traceback" not in bad_job.error
    assert bad_job.message == f"failed: {bad_job.error}"
    assert good_job.status == "succeeded"


def test_a_stored_spec_the_engine_cannot_read_fails_at_its_claim_and_disturbs_nothing(
        dispatcher, sessions, alice):  # noqa: ANN001
    bad = submit(sessions, alice, max_attempts=3)
    with sessions() as session:  # e.g. written by a server whose spec knew another algorithm
        session.execute(update(Job).where(Job.id == bad).values(
            spec={**reread(sessions, bad).spec, "algorithm": {"name": "no-such-algorithm"}}))
        session.commit()
    good = submit(sessions, alice)
    bad_job = wait_for(sessions, bad, {"failed", "succeeded"})
    assert (bad_job.status, bad_job.attempt) == ("failed", 1)
    assert bad_job.error.startswith("the stored spec is not a valid job: ValidationError: ")
    assert wait_for(sessions, good, {"failed", "succeeded"}).status == "succeeded"


def test_the_driver_runs_in_its_own_ray_process_and_its_placement_is_recorded(
        dispatcher, sessions, alice):  # noqa: ANN001
    job = wait_for(sessions, submit(sessions, alice), {"succeeded", "failed"})
    assert job.status == "succeeded"
    placement = job.progress["placement"]
    assert placement["driver"]["pid"] != os.getpid()
    assert [sorted(worker) for worker in placement["workers"]] == [["device", "node", "pid"]]
    assert placement["workers"][0]["pid"] not in (os.getpid(), placement["driver"]["pid"])
    assert placement["workers"][0]["device"] == "cpu"


def running_past(sessions, job_id: str, iteration: int, placed: bool = False):  # noqa: ANN001, ANN201
    """The job once it runs at or past ``iteration`` (and, if ``placed``, has recorded where
    its driver and workers run); fails after 60 s."""
    def reached():  # noqa: ANN202
        job = reread(sessions, job_id)
        far_enough = job.status == "running" and job.progress.get("iteration", 0) >= iteration
        return job if far_enough and (not placed or "placement" in job.progress) else None

    return wait_until(reached, 60, f"job {job_id} running at iteration {iteration}")


def test_a_killed_driver_is_retried_and_resumes_from_its_checkpoint(dispatcher, sessions,
                                                                     alice):  # noqa: ANN001
    job_id = submit(sessions, alice, iterations=400, checkpoint_every=20)
    job = running_past(sessions, job_id, 40, placed=True)
    os.kill(job.progress["placement"]["driver"]["pid"], signal.SIGKILL)
    job = wait_for(sessions, job_id, {"succeeded", "failed"})
    assert (job.status, job.attempt) == ("succeeded", 2)
    assert "driver died" in job.error


def test_cancelling_a_running_job_stops_it_within_five_seconds(dispatcher, sessions, alice,
                                                               settings, tmp_path):  # noqa: ANN001
    job_id = submit(sessions, alice, iterations=1_000_000, checkpoint_every=20)
    running_past(sessions, job_id, 20)
    with sessions.begin() as session:
        job_store.request_cancel(session=session, job_id=job_id, owner=alice)
    asked = time.monotonic()
    job = wait_for(sessions, job_id, {"cancelled", "failed", "succeeded"}, timeout=10)
    assert job.status == "cancelled"
    assert time.monotonic() - asked < 5.0
    store = artifacts.get_store(settings.storage_config())
    assert store.fetch_checkpoint(job_id, tmp_path / "checkpoint")
    assert sorted(path.name for path in (tmp_path / "checkpoint").iterdir()) == [
        "checkpoint.json", "checkpoint.safetensors"]


def test_a_job_asking_for_more_gpus_than_the_cluster_has_stays_queued_with_a_reason(
        dispatcher, sessions, alice):  # noqa: ANN001
    job_id = submit(sessions, alice, resources={"workers": 1, "gpus_per_worker": 2})
    def explained():  # noqa: ANN202
        job = reread(sessions, job_id)
        return job if job.message else None

    job = wait_until(explained, 30, "a reason on the queued job")
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
        with session.begin():
            claims.claim_next_job(session=session, worker_id="embedded:me", lease_s=3600)
    restarted = Dispatcher(settings, sessions, worker_id="embedded:me")
    restarted.start()
    try:
        job = wait_for(sessions, job_id, {"succeeded", "failed"})
    finally:
        restarted.stop()
    assert (job.status, job.attempt, job.interruptions) == ("succeeded", 1, 1)


def test_errors_that_cannot_change_on_retry_fail_at_once_and_the_rest_retry():
    from metaserve.service.dispatcher import Outcome, classify_driver_death, classify_job_error
    from metaserve.workers.engine.checkpoints import CheckpointError
    from metaserve.workers.object_store import StorageError
    from metaserve.workers.tasks.fewshot import DatasetError

    assert classify_job_error(DatasetError("dataset path '/x' does not exist")) == (
        Outcome.FAILED, "DatasetError: dataset path '/x' does not exist")
    assert classify_job_error(CheckpointError("checkpoint files disagree\nmore")) == (
        Outcome.FAILED, "CheckpointError: checkpoint files disagree")
    assert classify_job_error(ConnectionError("connection reset")) == (
        Outcome.RETRY, "ConnectionError: connection reset")
    assert classify_job_error(StorageError(
        "artifact store s3://b/p at http://s3:9000: endpoint unreachable (connection refused)")) == (
        Outcome.UNSCHEDULABLE, "waiting for the artifact store: artifact store s3://b/p at "
                               "http://s3:9000: endpoint unreachable (connection refused)")
    assert classify_driver_death(RuntimeError("The actor died unexpectedly"))[0] is Outcome.RETRY
    assert classify_driver_death(RuntimeError(
        "Task was killed due to the node running low on memory. Memory on the node was 23 GB; "
        "OutOfMemoryError raised by the memory monitor")) == (
        Outcome.FAILED, "out of memory: the job's driver was killed by Ray's memory monitor")


def test_a_driver_that_outgrows_its_memory_request_fails_on_attempt_1(settings, sessions,
                                                                      alice, monkeypatch):  # noqa: ANN001
    # An estimate that misses the process itself, and a floor of 64 MiB: less than the
    # interpreter and torch alone hold, so the driver is over its request at once.
    monkeypatch.setattr("metaserve.workers.cost.RUNTIME_BYTES", 2**20)
    small = Dispatcher(settings.model_copy(update={"driver_memory_mb": 64}), sessions)
    small.start()
    try:
        job = wait_for(sessions, submit(sessions, alice, max_attempts=3), {"succeeded", "failed"})
    finally:
        small.stop()
    assert (job.status, job.attempt) == ("failed", 1)
    assert re.fullmatch(r"DriverOutOfMemory: out of memory: the job's driver held \d+ MiB, "
                        r"more than the 64 MiB it asked for", job.error)


def test_dispatcher_health_reports_a_live_claim_loop_and_goes_stale_when_it_stops(
        settings, sessions, monkeypatch):  # noqa: ANN001
    from typer.testing import CliRunner

    from metaserve.service import settings as settings_module
    from metaserve.cli import app
    from metaserve.service.dispatcher import dispatcher_healthy

    health = settings.dispatcher_health_path
    assert dispatcher_healthy(health, max_age_s=30)[0] is False
    monkeypatch.setenv("METASERVE_DATA_DIR", str(settings.data_dir))
    settings_module.get_settings.cache_clear()
    try:
        assert CliRunner().invoke(app, ["dispatcher", "--health"]).exit_code == 1
        live = Dispatcher(settings, sessions, health_path=health)
        live.start()
        try:
            wait_until(health.exists, 60, "the dispatcher's health file")
            result = CliRunner().invoke(app, ["dispatcher", "--health"])
            assert (result.exit_code, result.output.split(":")[0]) == (0, "ok")
        finally:
            live.stop()
    finally:
        settings_module.get_settings.cache_clear()
    healthy, reason = dispatcher_healthy(health, max_age_s=0.0)
    assert not healthy and reason.startswith("last health report")


def test_a_job_past_its_max_runtime_fails_with_that_reason_and_no_retry(dispatcher, sessions,
                                                                        alice):  # noqa: ANN001
    job_id = submit(sessions, alice, iterations=1_000_000, max_runtime_s=3, max_attempts=3)
    job = wait_for(sessions, job_id, {"succeeded", "failed", "cancelled"}, timeout=90)
    assert (job.status, job.attempt) == ("failed", 1)
    assert job.error == "ran longer than its max_runtime_s of 3 s; stopped"
