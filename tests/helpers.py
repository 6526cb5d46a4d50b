"""Plain helpers shared by test modules: specs, users and keys, jobs driven through the service
layer as the dispatcher drives them, and waiting by polling with a deadline. Fixtures live in
the conftest.py files; no test module imports another."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from metaserve.service import artifacts, auth, claims, job_store, jobs
from metaserve.service.orm import Job, JobStatus, User
from metaserve.workers.spec import ALGORITHMS, TASK_FAMILIES, JobSpec
from tests.server_process import metaserve_executable

T = TypeVar("T")

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}
# A sine job that finishes in seconds on one CPU (the dispatcher's and the job log's tests).
SHORT_SINE = {
    "algorithm": {"name": "maml"},
    "task_family": {"name": "sine"},
    "meta_batch_size": 5,
    "iterations": 30,
    "log_every": 5,
    "checkpoint_every": 10,
    "evaluation": {"every": 0, "tasks": 20, "inner_steps": [1]},
}


# A sine job of 240 iterations checkpointed every 50: long enough to be interrupted mid-run
# (SIGKILL, SIGTERM) and resumed, then compared bit for bit with an undisturbed run.
RESUMABLE_SINE = {**TWO_LINE_SPEC, "iterations": 240, "checkpoint_every": 50, "log_every": 10,
                  "evaluation": {"every": 100, "tasks": 50, "inner_steps": [1]}}


def wait_for_iteration(client, job_id: str, iteration: int, timeout_s: float = 120) -> dict:  # noqa: ANN001
    """The job as read once its progress reached ``iteration`` (or when time ran out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if (job["progress"] or {}).get("iteration", 0) >= iteration or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def assert_same_bits_as_undisturbed(spec: dict, served: dict[str, torch.Tensor],
                                    directory: Path) -> None:
    """``served`` (a job's meta-initialization) equals, tensor for tensor, what an undisturbed
    ``Trainer.run`` of ``spec`` writes. The job's worker runs torch on cpus_per_worker (1)
    threads; on some CPUs (seen on an Intel Xeon, not on AMD EPYC) torch's kernels round
    differently on 1 and 2 threads, so the reference runs on one too."""
    from safetensors.torch import load_file

    from metaserve.workers.engine import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(spec).run(directory)
    finally:
        torch.set_num_threads(threads)
    undisturbed = load_file(directory / "meta_init.safetensors")
    assert sorted(served) == sorted(undisturbed)
    for name in served:
        assert torch.equal(served[name], undisturbed[name]), name
# Two iterations of sine MAML: a real meta-initialization for the adapt tests.
SINE_SPEC = {"algorithm": {"name": "maml", "inner_steps": 1}, "task_family": {"name": "sine"},
             "iterations": 2, "evaluation": {"every": 0, "tasks": 2, "inner_steps": [1]}}
WORKER = "worker-1"
LEASE_S = 30.0


# --------------------------------------------------------------------------- waiting


def wait_until(condition: Callable[[], T], timeout_s: float, message: str = "",
               interval_s: float = 0.1) -> T:
    """``condition()``'s first truthy value, polled every ``interval_s``; fails the test with
    ``message`` when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {message or condition}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- users and keys


def make_user(sessions: sessionmaker[Session], name: str, is_admin: bool = False) -> tuple[User, str]:
    """A user and their API key."""
    with sessions() as session:
        return auth.create_key(session=session, name=name, is_admin=is_admin)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------- jobs


def submit_over_http(client, auth_header: dict[str, str], spec: dict = TWO_LINE_SPEC) -> str:  # noqa: ANN001
    """The id of a job submitted through the API (``client`` is a TestClient or httpx.Client)."""
    response = client.post("/v1/jobs", json=spec, headers=auth_header)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit_to_store(session: Session, owner: User, key: str | None = None, **spec: Any) -> Job:
    """The two-line job (``spec`` overriding its fields) submitted through the service layer."""
    job, _ = jobs.submit_job(session=session, owner=owner,
                             spec=JobSpec.model_validate({**TWO_LINE_SPEC, **spec}),
                             idempotency_key=key)
    return job


def submit_short_sine(sessions: sessionmaker[Session], owner: User, **spec: Any) -> str:
    with sessions() as session:
        job, _ = jobs.submit_job(session=session, owner=owner,
                                 spec=JobSpec.model_validate({**SHORT_SINE, **spec}))
        return job.id


def claim(sessions: sessionmaker[Session]) -> str:
    """Claims the next queued job as ``WORKER`` and returns its id."""
    with sessions.begin() as session:
        job = claims.claim_next_job(session=session, worker_id=WORKER, lease_s=LEASE_S)
    assert job is not None
    return job.id


def finish(sessions: sessionmaker[Session], job_id: str, status: JobStatus) -> None:
    with sessions.begin() as session:
        job_store.finish_job(session=session, job_id=job_id, worker_id=WORKER, status=status)


def reread(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def wait_for_job(sessions: sessionmaker[Session], job_id: str, statuses: set[str],
                 timeout: float = 120.0) -> Job:
    """The job once its status is in ``statuses``, or as it is when ``timeout`` passes (the
    caller's assertion then names the status it had)."""
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            job = session.get(Job, job_id)
            session.expunge(job)
        if job.status in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def wait_for_http_status(client, job_id: str, statuses: set[str], timeout: float) -> dict:  # noqa: ANN001
    """``GET /v1/jobs/{id}`` once its status is in ``statuses``, or when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.25)


def succeeded_job(client, sessions: sessionmaker[Session], auth_header: dict[str, str],  # noqa: ANN001
                  spec: dict, run: Path, artifact_root: Path) -> str:
    """A job submitted by ``auth_header``, run to success with ``run``'s meta-initialization,
    its artifacts registered as the dispatcher registers them."""
    job_id = client.post("/v1/jobs", json=spec, headers=auth_header).json()["id"]
    directory = artifacts.job_dir(artifact_root, job_id)
    directory.mkdir(parents=True)
    with sessions() as session:
        with session.begin():
            assert claims.claim_next_job(session=session, worker_id=WORKER, lease_s=LEASE_S).id == job_id
        for name in ("meta_init.safetensors", "meta_init.json"):
            described = artifacts.describe(Path(shutil.copy(run / name, directory / name)))
            with session.begin():
                job_store.add_artifact(session=session, job_id=job_id, name=name, size=described.size,
                                       sha256=described.sha256, media_type=described.media_type)
        with session.begin():
            job_store.finish_job(session=session, job_id=job_id, worker_id=WORKER, status=JobStatus.SUCCEEDED)
    return job_id


def sine_task(seed: int, shots: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support x, support y and query x of one sine task (amplitude 2, phase 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * shots, 1, generator=generator) * 10 - 5
    y = 2.0 * torch.sin(x - 0.5)
    return x[:shots], y[:shots], x[shots:]


# --------------------------------------------------------------------------- specs


def valid_specs() -> list[dict[str, Any]]:
    """One complete spec (every default filled in) per algorithm, each with the first task
    family it validates with."""
    specs = []
    for algorithm in ALGORITHMS:
        for family in TASK_FAMILIES:
            try:
                spec = JobSpec.model_validate({"algorithm": {"name": algorithm},
                                               "task_family": {"name": family}})
            except ValidationError:
                continue
            specs.append(spec.model_dump(mode="json"))
            break
    return specs


def number_paths(node: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path (keys and indices) of every number in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from number_paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from number_paths(value, (*path, index))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path



# --------------------------------------------------------------------------- the CLI


def invoke(*args: str):  # noqa: ANN201
    """``metaserve ARGS`` in this process (typer's runner); exceptions propagate."""
    from typer.testing import CliRunner

    from metaserve.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def cli_process(url: str, *args: str) -> subprocess.Popen:
    """``metaserve ARGS`` as a real process at 80 columns, against ``url`` with the key in
    ``METASERVE_API_KEY``."""
    env = {**os.environ, "METASERVE_URL": url,
           "METASERVE_API_KEY": os.environ["METASERVE_API_KEY"], "COLUMNS": "80"}
    return subprocess.Popen([metaserve_executable(), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
