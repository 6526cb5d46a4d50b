"""The CLI commands that follow work (``wait``, ``logs [-f]``, Ctrl-C during ``submit --wait``,
``--output json``, a 422's details, the progress line, ``metrics --plot``'s panels), against
the real API served by uvicorn; jobs are driven through the service layer as the dispatcher
drives them."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from metaserve.service import job_logs, job_store, jobs
from metaserve.cli.metric_plots import metric_panel
from metaserve.service.orm import JobStatus
from metaserve.client import Event, Progress, progress_line
from tests.helpers import claim, finish, invoke
from tests.helpers import cli_process as cli

pytestmark = pytest.mark.usefixtures("isolated_config", "artifact_root")

SPEC = "algorithm: {name: maml}\ntask_family: {name: sine}\n"


def submitted(tmp_path: Path) -> str:
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    return invoke("submit", "-q", str(spec)).output.strip()


def write_log(sessions, job_id: str, *messages: str) -> None:  # noqa: ANN001
    with sessions() as session:
        job_logs.add_log_records(session=session, job_id=job_id, attempt=1, records=[
            {"time": time.time(), "level": "INFO", "source": "driver pid 7 metaserve.workers",
             "message": message} for message in messages])


def test_logs_prints_the_log_and_logs_f_prints_new_lines_as_they_come(
        logged_in: str, tmp_path: Path, sessions) -> None:  # noqa: ANN001, F811
    job_id = submitted(tmp_path)
    claim(sessions)
    write_log(sessions, job_id, "first", "Traceback (most recent call last):\n  x\nValueError: \x1b[31m")
    printed = invoke("logs", job_id)
    assert printed.exit_code == 0, printed.output
    lines = printed.output.splitlines()
    assert lines[0].endswith(" INFO    driver pid 7 metaserve.workers: first")
    assert lines[1:] == [lines[1][:9] + "INFO    driver pid 7 metaserve.workers: Traceback (most "
                         "recent call last):", "  x", "ValueError: \\x1b[31m"]
    follower = cli(logged_in, "logs", "-f", job_id)
    try:
        assert follower.stdout.readline().endswith(": first\n")
        for _ in range(3):
            follower.stdout.readline()
        write_log(sessions, job_id, "while following")   # the job still runs
        assert follower.stdout.readline().endswith(": while following\n")
        assert follower.poll() is None
        finish(sessions, job_id, JobStatus.SUCCEEDED)
        assert follower.wait(timeout=20) == 0
    finally:
        follower.kill()


def test_wait_exits_0_for_a_succeeded_job_and_1_with_the_error_otherwise(
        logged_in: str, tmp_path: Path, sessions) -> None:  # noqa: ANN001, F811
    good, bad = submitted(tmp_path), submitted(tmp_path)
    claim(sessions)
    finish(sessions, good, JobStatus.SUCCEEDED)
    with sessions.begin() as session:
        job_store.request_cancel(session=session, job_id=bad, owner=_owner(session, bad))
    succeeded, cancelled = invoke("wait", "-q", good), invoke("wait", "-q", bad)
    assert (succeeded.exit_code, succeeded.output) == (0, f"{good}\n")
    assert (cancelled.exit_code, cancelled.output) == (
        1, f"error: {bad} cancelled: cancelled before it started\n")


def _owner(session, job_id: str):  # noqa: ANN001, ANN202
    from metaserve.service.orm import Job, User

    return session.get(User, session.get(Job, job_id).owner_id)


def test_ctrl_c_during_submit_wait_leaves_the_job_and_says_how_to_re_attach(
        logged_in: str, tmp_path: Path, sessions) -> None:  # noqa: ANN001, F811
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    process = cli(logged_in, "submit", str(spec), "--wait")
    try:
        first = process.stdout.readline()
        job_id = first.split()[1]
        time.sleep(1.0)  # following now
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:  # a CLI that did not stop is not left running
        process.kill()
        process.wait()
    assert process.returncode == 130
    assert f"Re-attach with: metaserve wait {job_id}" in err
    with sessions() as session:
        assert job_store.job_status(session=session, job_id=job_id) == JobStatus.QUEUED


def test_list_and_status_print_json_and_a_422_prints_each_detail_under_the_message(
        logged_in: str, tmp_path: Path) -> None:  # noqa: F811
    job_id = submitted(tmp_path)
    listed = json.loads(invoke("list", "--output", "json").output)
    shown = json.loads(invoke("status", job_id, "-o", "json").output)
    assert [job["id"] for job in listed] == [job_id]
    assert (shown["id"], shown["status"], shown["spec"]["algorithm"]["name"]) == (job_id, "queued", "maml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: {name: maml, inner_lr: -1}\ntask_family: {name: sine, nope: 1}\n")
    refused = invoke("submit", str(bad))
    assert refused.exit_code == 1
    assert refused.output.splitlines() == [
        "error: invalid request: algorithm.inner_lr, task_family.nope (422 validation_error)",
        "  algorithm.inner_lr: Input should be greater than 0",
        "  task_family.nope: Extra inputs are not permitted"]


def test_the_progress_line_shows_queue_reason_reconnecting_evaluation_and_rl_figures_in_80_columns() -> None:
    queued = Progress(name="sine-maml", status="queued",
                      message="waiting: alice has 4 running jobs (the most one user may run)")
    assert progress_line(queued, 40) == "queued: waiting: alice has 4 running jo…"
    running = Progress(name="sine-maml", status="running")
    for event in (Event("1", "metrics", {"step": 10, "values": {
                      "train/loss_after": 0.01234, "val/loss_step1": 0.5,
                      "val/accuracy_step1": 0.6, "val/accuracy_step10": 0.7,
                      "val/accuracy_step10_ci95": 0.02}}),
                  Event("2", "progress", {"iteration": 10, "total": 100, "tasks_per_s": 812.4,
                                          "eta_s": 65.0})):
        running.update(event)
    assert progress_line(running, 80) == "loss 0.0123  val acc@10 0.7  812 tasks/s  ETA 1m05s"
    # Narrower: the least important figures go first (ETA, then the rate), none is cut.
    assert progress_line(running, 40) == "loss 0.0123  val acc@10 0.7  812 tasks/s"
    assert progress_line(running, 30) == "loss 0.0123  val acc@10 0.7"
    assert progress_line(running, 16) == "val acc@10 0.7"
    running.reconnecting = True
    assert progress_line(running, 80) == "running, reconnecting..."
    rl = Progress(status="running")
    rl.update(Event("3", "progress", {"iteration": 3, "total": 50, "env_steps_per_s": 15230.0,
                                      "env_steps": 4000, "latest_return": -41.5, "eta_s": 20}))
    assert progress_line(rl, 80) == "return -41.5  15.2k steps/s  ETA 20s"
    assert len(progress_line(running, 80)) <= 80


def test_metrics_plot_panels_never_mix_loss_accuracy_and_returns_nor_plot_counters() -> None:
    names = ["train/loss_before", "train/loss_after", "val/loss_step1", "val/loss_step1_ci95",
             "val/accuracy_step5", "test/mse_step1", "train/return_before", "val/return_step1",
             "train/tasks", "train/env_steps", "train/tasks_per_second",
             "train/env_steps_per_second", "train/line_search_steps", "train/kl"]
    assert {name: metric_panel(name) for name in names} == {
        "train/loss_before": "train_loss", "train/loss_after": "train_loss",
        "val/loss_step1": "eval_loss", "val/loss_step1_ci95": None,
        "val/accuracy_step5": "accuracy", "test/mse_step1": "eval_loss",
        "train/return_before": "returns", "val/return_step1": "returns",
        "train/tasks": None, "train/env_steps": None, "train/tasks_per_second": None,
        "train/env_steps_per_second": None, "train/line_search_steps": None,
        "train/kl": "train_other"}


def test_status_shows_timestamps_duration_and_the_status_history(
        logged_in: str, tmp_path: Path, sessions) -> None:  # noqa: ANN001, F811
    job_id = submitted(tmp_path)
    queued = invoke("status", job_id).output
    assert "message:     waiting for a dispatcher: this server runs none" in queued
    claim(sessions)
    finish(sessions, job_id, JobStatus.SUCCEEDED)
    lines = invoke("status", job_id).output.splitlines()
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines
              if not line.startswith(" ") and line != "history:"}
    assert {"created_at", "started_at", "finished_at", "duration"} <= set(fields)
    assert fields["finished_at"].endswith(" UTC") and not fields["duration"].endswith("so far")
    history = lines[lines.index("history:") + 1:]
    assert [line.split()[2:4] for line in history] == [
        ["UTC", "queued"], ["UTC", "running"], ["UTC", "succeeded"]]


def test_submit_quiet_wait_shows_progress_on_a_terminal_stderr_and_prints_only_the_id(
        logged_in: str, tmp_path: Path, sessions) -> None:  # noqa: ANN001, F811
    import os
    import pty
    import select
    import subprocess

    from tests.helpers import WORKER
    from tests.server_process import metaserve_executable

    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    terminal, stderr = pty.openpty()
    env = {**os.environ, "METASERVE_URL": logged_in, "COLUMNS": "100"}
    process = subprocess.Popen([metaserve_executable(), "submit", "-q", "--wait", str(spec)],
                               stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    os.close(stderr)
    seen = b""

    def read_until(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while text not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([terminal], [], [], 0.5)[0]:
                seen += os.read(terminal, 4096)

    try:
        read_until(b"0/?")  # the bar is up while the job waits
        job_id = claim(sessions)
        with sessions.begin() as session:
            job_store.update_progress(session=session, job_id=job_id, worker_id=WORKER,
                                      progress={"iteration": 7, "total": 30})
        read_until(b"7/30")
        finish(sessions, job_id, JobStatus.SUCCEEDED)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
        os.close(terminal)
    assert (process.returncode, out) == (0, f"{job_id}\n")
