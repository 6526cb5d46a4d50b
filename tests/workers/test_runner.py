"""The Ray runner on a real local Ray: exact results, worker death, cancellation, resources."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metaserve.workers.engine import Trainer
from metaserve.workers.engine.loop import RunHooks
from metaserve.workers.exceptions import JobCancelled, Unschedulable
from metaserve.workers.runner import shard_ranges, worker_device
from metaserve.workers import registry
from metaserve.workers.spec import JobSpec


def run_job(spec: dict, *args, **kwargs) -> dict:  # noqa: ANN002, ANN003
    """:func:`metaserve.workers.registry.run_job` of a spec written here as a document (this
    file's edge: parsed once, as the API and the CLI do)."""
    return registry.run_job(JobSpec.model_validate(spec), *args, **kwargs)


pytestmark = pytest.mark.usefixtures("ray_session")

SPEC = {
    "algorithm": {"name": "maml"},
    "task_family": {"name": "sine"},
    "meta_batch_size": 8,
    "iterations": 40,
    "log_every": 5,
    "checkpoint_every": 10,
    "evaluation": {"every": 20, "tasks": 20, "inner_steps": [1]},
}


def _params(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "meta_init.safetensors")


def _assert_bit_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert torch.equal(left[name], right[name]), name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shard_ranges_are_contiguous_and_balanced() -> None:
    assert shard_ranges(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard_ranges(2, 4) == [[0], [1]]


def test_one_worker_on_ray_gives_the_bits_of_the_in_process_engine(tmp_path: Path) -> None:
    reports: list[tuple[int, dict]] = []
    run_job(SPEC, tmp_path / "ray", RunHooks(report=lambda step, m: reports.append((step, m))))
    Trainer(SPEC).run(tmp_path / "local")
    _assert_bit_identical(_params(tmp_path / "ray"), _params(tmp_path / "local"))
    train_steps = [step for step, metrics in reports if "train/loss_after" in metrics]
    assert train_steps == list(range(5, 41, 5))
    assert any("test/loss_step1" in metrics for _, metrics in reports)


def test_two_workers_are_deterministic_and_agree_with_one(tmp_path: Path) -> None:
    spec = {**SPEC, "resources": {"workers": 2}}
    run_job(spec, tmp_path / "a")
    run_job(spec, tmp_path / "b")
    _assert_bit_identical(_params(tmp_path / "a"), _params(tmp_path / "b"))
    run_job(SPEC, tmp_path / "one")
    one, two = _params(tmp_path / "one"), _params(tmp_path / "a")
    for name in one:  # same maths, only the summation order differs
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)


def test_inner_loop_workers_run_below_the_priority_of_the_process_that_serves(tmp_path: Path) -> None:
    """A job's workers (where its training runs) yield their core to the API server on a shared
    host: they run at a higher niceness than the process that asked for them (Ray's 15)."""
    niceness: list[int] = []

    def ready(workers: list[dict]) -> None:
        niceness.extend(os.getpriority(os.PRIO_PROCESS, worker["pid"]) for worker in workers)

    run_job({**SPEC, "iterations": 5, "resources": {"workers": 2}}, tmp_path,
            RunHooks(workers_ready=ready))
    assert len(niceness) == 2 and min(niceness) > os.getpriority(os.PRIO_PROCESS, 0), niceness


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_of_an_inner_loop_worker_does_not_change_the_result(tmp_path: Path,
                                                                    workers: int) -> None:
    """One worker: killed at step 15 while the segment after it is queued on it (the driver
    finds out waiting for that segment's result; at step 20 the evaluation would); two:
    killed at step 20 between steps."""
    spec = {**SPEC, "iterations": 60, "resources": {"workers": workers}}
    kill_at = 15 if workers == 1 else 20
    run_job(spec, tmp_path / "undisturbed")
    workers: list[list[dict]] = []
    killed: list[int] = []

    def kill_one_worker(step: int, metrics: dict) -> None:
        if step == kill_at and not killed and "train/loss_after" in metrics:
            killed.append(workers[-1][0]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    run_job(spec, tmp_path / "disturbed",
            RunHooks(report=kill_one_worker, workers_ready=workers.append))
    assert killed, "no worker was killed"
    assert len(workers) == 2 and workers[1][0]["pid"] != killed[0]
    _assert_bit_identical(_params(tmp_path / "undisturbed"), _params(tmp_path / "disturbed"))


def test_cancel_stops_the_job_and_its_actors_within_five_seconds(tmp_path: Path) -> None:
    spec = {**SPEC, "iterations": 100_000, "checkpoint_every": 5}
    stop = threading.Event()
    checkpoints: list = []

    def checkpointed(paths) -> None:  # noqa: ANN001
        checkpoints.append(paths)
        stop.set()

    requested: list[float] = []
    workers: list[list[dict]] = []
    with pytest.raises(JobCancelled):
        def should_stop() -> bool:
            if stop.is_set() and not requested:
                requested.append(time.monotonic())
            return stop.is_set()
        run_job(spec, tmp_path, RunHooks(checkpointed=checkpointed, should_stop=should_stop,
                                         workers_ready=workers.append))
    assert time.monotonic() - requested[0] < 5.0
    assert (tmp_path / "checkpoint" / "checkpoint.safetensors").exists()
    pids = [worker["pid"] for worker in workers[-1]]
    deadline = time.monotonic() + 5.0
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids))


def test_a_job_asking_for_gpus_the_cluster_lacks_is_unschedulable(tmp_path: Path) -> None:
    spec = {**SPEC, "resources": {"workers": 2, "gpus_per_worker": 1}}
    with pytest.raises(Unschedulable, match=r"2 GPU\(s\) asked \(2 workers × 1\), cluster has 0"):
        run_job(spec, tmp_path)


@pytest.mark.parametrize(("gpus", "resource", "cuda", "device"), [
    (0.0, "GPU", True, "cpu"),         # asked for no GPU: CPU even where CUDA exists
    (1.0, "GPU", True, "cuda"),
    (0.5, "gpu_slot", True, "cuda"),   # a stand-in resource on a node with CUDA
    (1.0, "gpu_slot", False, "cpu"),   # ... and on a CPU-only node
])
def test_worker_device_follows_the_request_and_the_node(gpus, resource, cuda, device):
    assert worker_device(gpus, resource, cuda) == device


def test_worker_given_a_gpu_on_a_node_without_cuda_refuses_to_run_on_the_cpu():
    with pytest.raises(RuntimeError, match="worker was given a GPU but torch sees no CUDA device"):
        worker_device(1.0, "GPU", False)


def test_a_driver_removes_the_scratch_directories_of_dead_drivers_only(tmp_path, monkeypatch):
    import subprocess
    import sys

    from metaserve.workers import supervisor

    monkeypatch.setattr(supervisor.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"metaserve-job-J1-p{dead}-abc"
    live = tmp_path / f"metaserve-job-J2-p{os.getpid()}-def"
    other = tmp_path / "metaserve-job-notes"
    for directory in (stale, live, other):
        (directory / "checkpoint").mkdir(parents=True)
    supervisor.remove_stale_scratch()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, other.name])
