"""A job's log through the real dispatcher and Ray: the driver's and the inner-loop workers'
records reach the database, and a job that raises in its inner loop shows the traceback in its
log while its ``error`` stays one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metaserve.service import job_logs
from metaserve.service.orm import User
from tests.helpers import submit_short_sine as submit
from tests.helpers import wait_for_job as wait_for

pytestmark = pytest.mark.usefixtures("ray_session")


def tiny_npz(path: Path, classes: int = 40, per_class: int = 3) -> Path:
    """``classes`` classes of ``per_class`` 8x8 images: enough for 1+1 shots, not for 5+1."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(classes * per_class, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    np.savez(path, images=images, labels=labels)
    return path


def read_all(sessions, job_id: str, owner: User) -> list[dict]:  # noqa: ANN001
    with sessions() as session:
        return job_logs.read_logs(session=session, job_id=job_id, owner=owner, after=0,
                                  limit=job_logs.MAX_LOG_PAGE).lines


def test_a_job_that_raises_in_its_inner_loop_has_the_traceback_in_its_log_and_a_one_line_error(
        dispatcher, sessions, alice, tmp_path):  # noqa: ANN001, F811
    dataset = tiny_npz(tmp_path / "tiny.npz")
    job_id = submit(sessions, alice, max_attempts=2,
                    task_family={"name": "images", "path": str(dataset), "image_size": 8,
                                 "ways": 2, "support_shots": 1, "query_shots": 1},
                    model={"name": "mlp", "hidden": [8]},
                    evaluation={"every": 0, "tasks": 4, "inner_steps": [1], "support_shots": 5})
    job = wait_for(sessions, job_id, {"failed", "succeeded"}, timeout=180)
    assert (job.status, job.attempt) == ("failed", 1)
    assert job.error.startswith("DatasetError: ") and "fewer than ways=2" in job.error
    assert "\n" not in job.error and "Traceback" not in job.error
    lines = read_all(sessions, job_id, alice)
    messages = "\n".join(line["message"] for line in lines)
    failure = [line for line in lines if line["message"].startswith("the job's attempt failed")]
    assert len(failure) == 1 and failure[0]["level"] == "ERROR"
    assert failure[0]["source"].startswith("driver pid ")
    # The inner-loop worker's own traceback, carried by Ray's error, ends with the job's error.
    assert "Traceback (most recent call last)" in failure[0]["message"]
    assert "InnerLoopWorker.evaluate" in failure[0]["message"]
    assert "fewer than ways=2" in failure[0]["message"].splitlines()[-1]
    # A worker's own record (its warning about classes too small for 5+1 shots).
    worker = [line for line in lines if line["source"].startswith("worker pid ")]
    assert any("have fewer than 6 images" in line["message"] for line in worker), messages
    assert [line["source"] for line in lines].count("dispatcher") == 2  # started, failed
    assert lines[-1]["message"] == f"attempt 1 failed: {job.error}"
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
