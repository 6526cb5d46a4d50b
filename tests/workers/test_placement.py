"""Placement on real Ray: a job's workers as one gang (placement group), one supervisor per
job, and an autoscaling cluster (no veto against the current nodes, pending placement shown
and bounded). The scenarios that need fake resources or nodes joining run on a cluster of
their own (tests/workers/placement_scenarios.py, in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayActorError

from metaserve.workers import registry
from metaserve.workers.engine.loop import RunHooks
from metaserve.workers.exceptions import PlacementTimeout, Unschedulable
from metaserve.workers.job_run import JobRun
from metaserve.workers.object_store import StorageConfig
from metaserve.workers.runner import (DRIVER_GROUP_PREFIX, RunOptions, check_schedulable,
                                     remove_job_placement_groups)
from metaserve.workers.spec import JobSpec
from metaserve.workers.supervisor import SUPERVISOR_NAMESPACE, start_supervisor, supervisor_name
from tests.helpers import SHORT_SINE

ROOT = Path(__file__).resolve().parents[2]
TWO_GPU_WORKERS = {**SHORT_SINE, "resources": {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1}}


def scenario(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, "-m", "tests.workers.placement_scenarios", name, str(out)],
                   cwd=ROOT, check=True, timeout=420, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_two_jobs_of_two_workers_on_room_for_three_run_one_after_the_other(tmp_path: Path) -> None:
    record = scenario("gang", tmp_path)
    assert not record["deadlocked"]
    first, second = sorted((record["a"], record["b"]), key=lambda job: job["ready"])
    assert first["error"] is None and second["error"] is None, record
    assert first["waiting"] == []
    assert second["waiting"][0]["text"] == "waiting for placement: 2 worker(s) × 1 CPU, 1 gpu_slot"
    assert second["ready"] >= first["ended"]  # it started whole once the first had finished
    # While it waited it held nothing: the third gpu_slot stayed free (3 while the first job's
    # group went and the second's came).
    assert record["free_gpu_slot_while_waiting"] and set(record["free_gpu_slot_while_waiting"]) <= {1.0, 3.0}


@pytest.mark.ray
@pytest.mark.slow
def test_an_autoscaling_cluster_keeps_a_job_pending_until_a_node_that_fits_joins(tmp_path: Path) -> None:
    record = scenario("scale_up", tmp_path)
    job = record["a"]
    assert not record["deadlocked"] and job["error"] is None, record
    assert job["waiting"][0]["text"].startswith("waiting for placement: 2 worker(s)")
    assert job["waiting"][0]["time"] <= record["node_added"] <= job["ready"] <= job["ended"]


@pytest.mark.usefixtures("ray_session")
def test_without_autoscaling_a_job_larger_than_the_cluster_is_refused_at_once() -> None:
    spec = JobSpec.model_validate(TWO_GPU_WORKERS)
    with pytest.raises(Unschedulable, match=r"2 GPU\(s\) \(gpu_slot\) asked \(2 workers × 1\), cluster has 0"):
        check_schedulable(spec, RunOptions(gpu_resource="gpu_slot"))
    check_schedulable(spec, RunOptions(gpu_resource="gpu_slot", autoscaling=True))  # no veto


@pytest.mark.usefixtures("ray_session")
def test_autoscaling_placement_shows_it_waits_then_fails_after_the_pending_timeout(tmp_path: Path) -> None:
    waiting: list[str] = []
    options = RunOptions(gpu_resource="gpu_slot", autoscaling=True, pending_timeout_s=8.0)
    started = time.monotonic()
    with pytest.raises(PlacementTimeout) as raised:
        registry.run_job(JobSpec.model_validate(TWO_GPU_WORKERS), tmp_path,
                         RunHooks(progress=lambda p: waiting.append(p.get("waiting", ""))), options)
    assert 8.0 <= time.monotonic() - started < 60
    assert waiting[0] == "waiting for placement: 2 worker(s) × 1 CPU, 1 gpu_slot"
    assert str(raised.value) == (
        "no placement for the job's workers (2 worker(s) × 1 CPU, 1 gpu_slot) within the pending "
        "timeout of 8 s (placement_pending_timeout_s): the cluster did not scale up to fit them")
    groups = ray.util.placement_group_table().values()
    assert not [group for group in groups if group["name"].startswith("metaserve-workers-")
                and group["state"] != "REMOVED"]  # nothing stays reserved


def _run(job_id: str, memory_bytes: int) -> JobRun:
    return JobRun(job_id=job_id, spec=JobSpec.model_validate(SHORT_SINE), attempt=1,
                  memory_bytes=memory_bytes)


@pytest.mark.usefixtures("ray_session")
def test_a_driver_larger_than_every_node_is_refused_at_once_or_waits_when_autoscaling(tmp_path: Path) -> None:
    storage = StorageConfig(root=str(tmp_path / "artifacts"))
    huge = _run("job_huge", 1 << 50)
    with pytest.raises(Unschedulable, match="the job's driver asks 1048576.00 GiB of memory"):
        start_supervisor(huge, storage, RunOptions())
    told: list[str] = []
    with pytest.raises(PlacementTimeout, match=r"driver \(1048576.00 GiB of memory\) within the "
                                               r"pending timeout of 8 s"):
        start_supervisor(huge, storage, RunOptions(autoscaling=True, pending_timeout_s=8.0),
                         waiting=told.append)
    assert told == ["waiting for placement: the job's driver (1048576.00 GiB of memory)"]
    with pytest.raises(ValueError):  # the pending actor went with the failure
        ray.get_actor(supervisor_name("job_huge"), namespace=SUPERVISOR_NAMESPACE)
    assert not _reserved(DRIVER_GROUP_PREFIX)  # and its placement group (the autoscaler's demand)
    # A driver that fits starts in its own group, which the dispatcher's cleanup removes.
    small = start_supervisor(_run("job_small", 200 << 20), storage,
                             RunOptions(autoscaling=True, pending_timeout_s=60.0))
    try:
        assert _reserved(DRIVER_GROUP_PREFIX) == [f"{DRIVER_GROUP_PREFIX}{supervisor_name('job_small')}"]
    finally:
        ray.kill(small)
    assert remove_job_placement_groups(supervisor_name("job_small")) == 1
    assert not _reserved(DRIVER_GROUP_PREFIX)


def _reserved(prefix: str) -> list[str]:
    return [group["name"] for group in ray.util.placement_group_table().values()
            if group["name"].startswith(prefix) and group["state"] != "REMOVED"]


@pytest.mark.usefixtures("ray_session")
def test_a_new_attempt_ends_the_supervisor_of_the_previous_one_first(tmp_path: Path) -> None:
    storage = StorageConfig(root=str(tmp_path / "artifacts"))
    first = start_supervisor(_run("job_twice", 200 << 20), storage, RunOptions())
    first_pid = ray.get(first.ready.remote())["pid"]
    second = start_supervisor(_run("job_twice", 200 << 20), storage, RunOptions())
    try:
        with pytest.raises(RayActorError):
            ray.get(first.ready.remote(), timeout=30)
        assert ray.get(second.ready.remote())["pid"] != first_pid
        named = ray.get_actor(supervisor_name("job_twice"), namespace=SUPERVISOR_NAMESPACE)
        assert ray.get(named.ready.remote())["pid"] == ray.get(second.ready.remote())["pid"]
    finally:
        ray.kill(second)
