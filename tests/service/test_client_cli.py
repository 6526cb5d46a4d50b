"""The CLI's HTTP client commands (login, submit, list, status, metrics, cancel, fetch)
against the real API served by uvicorn in a thread; errors are one line and exit code 1."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from metaserve.service import job_store
from tests.helpers import invoke

pytestmark = pytest.mark.usefixtures("isolated_config", "artifact_root")


def test_login_checks_the_key_and_writes_the_config_file(
        live_url: str, key: str, tmp_path: Path, isolated_config: Path) -> None:  # noqa: F811
    (tmp_path / "admin.key").write_text(key + "\n")
    wrong = invoke("login", "--url", live_url, "--api-key", "ms_wrong")
    right = invoke("login", "--url", live_url, "--api-key-file", str(tmp_path / "admin.key"))
    assert (wrong.exit_code, wrong.output) == (1, "error: Missing or invalid API key. (401 unauthorized)\n")
    assert (right.exit_code, right.output) == (0, f"logged in to {live_url}; saved in {isolated_config}\n")
    assert isolated_config.read_text() == f'url = "{live_url}"\napi_key = "{key}"\n'
    assert stat.S_IMODE(isolated_config.stat().st_mode) == 0o600


def test_submit_list_status_and_cancel_a_job(logged_in: str, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("algorithm: {name: maml}\ntask_family: {name: sine}\n")
    submitted = invoke("submit", str(spec), "--set", "name=cli-job")
    job_id = submitted.output.split()[1]
    listed = invoke("list")
    shown = invoke("status", job_id)
    cancelled = invoke("cancel", job_id)
    again = invoke("cancel", job_id)
    assert (submitted.exit_code, submitted.output) == (0, f"submitted {job_id} (cli-job)\n")
    assert job_id in listed.output and "cli-job" in listed.output and "queued" in listed.output
    assert shown.output.splitlines()[:4] == [f"id:          {job_id}", "name:        cli-job",
                                             "status:      queued", "attempt:     0 of 3"]
    assert cancelled.output == f"{job_id} cancelled\n"
    assert (again.exit_code, again.output) == (
        1, f"error: job {job_id} is cancelled; it cannot be cancelled (409 invalid_transition)\n")


def test_submit_quiet_prints_only_the_job_id(logged_in: str, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("algorithm: {name: maml}\ntask_family: {name: sine}\n")
    submitted = invoke("submit", "-q", str(spec))
    job_id = submitted.output.strip()
    assert (submitted.exit_code, submitted.output) == (0, f"{job_id}\n")
    assert invoke("status", job_id).output.splitlines()[0] == f"id:          {job_id}"


def test_submit_wait_of_a_job_cancelled_before_it_ran_exits_1_with_its_status(
        logged_in: str, tmp_path: Path, sessions) -> None:  # noqa: ANN001
    import threading

    spec = tmp_path / "job.yaml"
    spec.write_text("algorithm: {name: maml}\ntask_family: {name: sine}\n")

    def cancel_when_submitted() -> None:
        from metaserve.service.orm import Job, User

        for _ in range(200):
            with sessions.begin() as session:
                job = session.query(Job).first()
                if job is not None:
                    owner = session.get(User, job.owner_id)
                    job_store.request_cancel(session=session, job_id=job.id, owner=owner)
                    return
            threading.Event().wait(0.05)

    canceller = threading.Thread(target=cancel_when_submitted)
    canceller.start()
    result = invoke("submit", str(spec), "--wait")
    canceller.join()
    job_id = result.output.split()[1]
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == f"submitted {job_id} (maml-sine)"
    assert result.output.splitlines()[-1] == f"error: {job_id} cancelled: cancelled before it started"


def test_invalid_input_and_unknown_jobs_are_one_line_errors(logged_in: str, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("algorithm: {name: maml, inner_lr: -1}\ntask_family: {name: sine}\n")
    invalid = invoke("submit", str(spec))
    missing = invoke("submit", str(tmp_path / "none.yaml"))
    unknown = invoke("status", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert (invalid.exit_code, invalid.output) == (  # each detail under the message
        1, "error: invalid request: algorithm.inner_lr (422 validation_error)\n"
           "  algorithm.inner_lr: Input should be greater than 0\n")
    assert (missing.exit_code, missing.output) == (
        1, f"error: cannot read {tmp_path / 'none.yaml'}: No such file or directory\n")
    assert (unknown.exit_code, unknown.output) == (1, "error: Job not found. (404 not_found)\n")


def test_metrics_prints_the_latest_values_and_plots_the_curves_and_fetch_needs_artifacts(
        logged_in: str, tmp_path: Path, sessions) -> None:  # noqa: ANN001
    job_id = invoke("submit", _spec(tmp_path)).output.split()[1]
    with sessions.begin() as session:
        job_store.add_metrics(session=session, job_id=job_id, rows=[
            (step, name, value) for step in (10, 20, 30)
            for name, value in (("train/loss_after", 3 / step), ("train/loss_before", 1.0))]
            + [(30, "val/loss_step1", 0.5), (30, "val/loss_step1_ci95", 0.1)])
    shown = invoke("metrics", job_id, "--plot", str(tmp_path / "plots" / "loss.png"))
    fetched = invoke("fetch", job_id, "-o", str(tmp_path / "out"))
    assert shown.exit_code == 0, shown.output
    assert "train/loss_after" in shown.output and "0.1" in shown.output
    assert shown.output.endswith(f"wrote {tmp_path / 'plots' / 'loss.png'}\n")
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (fetched.exit_code, fetched.output) == (
        1, f"error: job {job_id} has no final artifacts yet (status: queued)\n")
    cancelled = invoke("cancel", job_id)
    assert cancelled.exit_code == 0, cancelled.output
    fetched = invoke("fetch", job_id, "-o", str(tmp_path / "out"))  # ended: none will come
    assert (fetched.exit_code, fetched.output) == (
        1, f"error: job {job_id} cancelled without final artifacts: cancelled before it "
           "started\n")


def test_fetch_downloads_a_meta_rl_jobs_meta_policy(logged_in: str, tmp_path: Path, sessions,
                                                    artifact_root: Path) -> None:  # noqa: ANN001
    from metaserve.service.settings import Settings
    from metaserve.workers.object_store import open_store

    job_id = invoke("submit", _spec(tmp_path)).output.split()[1]
    written = tmp_path / "written"
    (written / "checkpoint").mkdir(parents=True)
    files = {"meta_policy.safetensors": b"tensors", "meta_policy.json": b"{}",
             "checkpoint/checkpoint.json": b"{}"}
    for name, data in files.items():
        (written / name).write_bytes(data)
    store = open_store(Settings().storage_config())
    with sessions() as session:
        for described in store.put(job_id, [written / name for name in files], attempt=1):
            with session.begin():
                job_store.add_artifact(session=session, job_id=job_id, name=described.name,
                                       size=described.size, sha256=described.sha256,
                                       media_type=described.media_type)
    fetched = invoke("fetch", job_id, "-o", str(tmp_path / "out"))
    assert (fetched.exit_code, fetched.output) == (
        0, f"downloaded meta_policy.json, meta_policy.safetensors to {tmp_path / 'out'}; load it "
           f"with Client().load_meta_policy({str(tmp_path / 'out')!r})\n")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "meta_policy.json", "meta_policy.safetensors"]
    assert (tmp_path / "out" / "meta_policy.safetensors").read_bytes() == b"tensors"


def _spec(tmp_path: Path) -> str:
    spec = tmp_path / "job.yaml"
    spec.write_text("algorithm: {name: maml}\ntask_family: {name: sine}\n")
    return str(spec)
