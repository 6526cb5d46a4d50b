"""``metaserve models create|register|alias|list|show`` against the real API served by uvicorn
(no dispatcher: succeeded jobs and a sweep's trial are written as the dispatcher writes them)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import httpx
import pytest

from metaserve.service import child_jobs, claims, job_store
from metaserve.service.orm import JobStatus
from metaserve.workers.engine import Trainer
from metaserve.workers.object_store import StorageConfig, open_store
from tests.helpers import SINE_SPEC, invoke, succeeded_job

pytestmark = pytest.mark.usefixtures("isolated_config", "artifact_root")
TRIAL = "0" * 25 + "9"


@pytest.fixture
def run_files(tmp_path: Path) -> Path:
    """A run directory with final meta_init.* files (their bytes do not matter here)."""
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "meta_init.safetensors").write_bytes(b"weights")
    (directory / "meta_init.json").write_text("{}")
    return directory


def test_create_register_alias_list_and_show(logged_in, key, sessions, run_files,
                                            artifact_root):  # noqa: ANN001
    with httpx.Client(base_url=logged_in) as http:
        auth = {"Authorization": f"Bearer {key}"}
        first = succeeded_job(http, sessions, auth, SINE_SPEC, run_files, artifact_root)
        second = succeeded_job(http, sessions, auth, SINE_SPEC, run_files, artifact_root)
    created = invoke("models", "create", "sine", "--description", "kept")
    assert (created.exit_code, created.output) == (0, "created model sine\n")
    again = invoke("models", "create", "sine")
    assert (again.exit_code, again.output) == (
        1, "error: You already have a registered model of this name. (409 already_exists)\n")
    one = invoke("models", "register", "sine", "--job", first)
    assert (one.exit_code, one.output) == (0, f"models:/sine/1  job {first}  meta_init\n")
    two = invoke("models", "register", "sine", "--job", second, "--alias", "production")
    assert two.output == f"models:/sine/2  job {second}  meta_init  @production\n"
    moved = invoke("models", "alias", "sine", "production", "1")
    assert moved.output == f"models:/sine/1  job {first}  meta_init  @production\n"
    assert invoke("models", "alias", "sine", "production").output == moved.output
    assert invoke("models", "list").output == (
        "sine  latest 2  2 versions  aliases: production→1\n")
    assert invoke("models", "show", "sine").output == (
        f"sine: kept\n  models:/sine/2  job {second}  meta_init\n"
        f"  models:/sine/1  job {first}  meta_init  @production\n")
    shown = json.loads(invoke("models", "show", "sine", "-o", "json").output)
    assert [v["version"] for v in shown["versions"]] == [2, 1]
    bad = invoke("models", "alias", "sine", "latest", "1")
    assert bad.exit_code == 1
    assert bad.output.splitlines()[1:] == [
        "  alias: 'latest' is reserved for version numbers (latest, v<N>)"]
    removed = invoke("models", "alias", "sine", "production", "--delete")
    assert removed.output == "removed alias production of sine\n"
    missing = invoke("models", "alias", "sine", "production")
    assert (missing.exit_code, missing.output) == (1, "error: Model alias not found. (404 not_found)\n")


def test_register_a_sweeps_best_trial(logged_in, key, sessions, tmp_path, artifact_root):  # noqa: ANN001
    document = tmp_path / "sweep.yaml"
    document.write_text(
        "name: kept-sweep\nspec:\n  algorithm: {name: maml}\n  task_family: {name: sine}\n"
        "  iterations: 20\n  evaluation: {every: 5, tasks: 10, inner_steps: [1]}\n"
        "space:\n  algorithm.inner_lr: {grid: [0.01, 0.1]}\nsearch: {name: grid}\n"
        "scheduler: {name: asha}\n")
    sweep_id = invoke("sweep", "submit", str(document), "-q").output.strip()
    early = invoke("models", "register", "sine", "--sweep", sweep_id)
    assert early.exit_code == 1
    assert early.output.splitlines()[0] == (
        "error: Only a succeeded job with a final artifact can become a model version. "
        "(409 not_ready)")
    with sessions() as session:
        with session.begin():
            driver = claims.claim_next_job(session=session, worker_id="w", lease_s=30)
        with session.begin():
            child_jobs.start_child_job(session=session, parent_job_id=driver.id, worker_id="w",
                                       job_id=TRIAL, key="abc_00001", name="kept-sweep/abc_00001",
                                       spec=job_store.job_spec(driver))
            job_store.add_metrics(session=session, job_id=TRIAL,
                                  rows=[(20, "val/loss_step1", 0.25)])
            child_jobs.end_child_job(session=session, parent_job_id=driver.id, worker_id="w",
                                     job_id=TRIAL, status=JobStatus.SUCCEEDED, message="finished")
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        (scratch / "meta_init.safetensors").write_bytes(b"weights")
        (scratch / "meta_init.json").write_text("{}")
        for file in open_store(StorageConfig(root=str(artifact_root))).put(
                TRIAL, sorted(scratch.iterdir())):
            with session.begin():
                job_store.add_artifact(session=session, job_id=TRIAL, name=file.name,
                                       size=file.size, sha256=file.sha256,
                                       media_type=file.media_type)
    kept = invoke("models", "register", "sine", "--sweep", sweep_id)
    assert (kept.exit_code, kept.output) == (
        0, f"models:/sine/1  job {TRIAL} (sweep {sweep_id})  meta_init\n")


def readme_blocks() -> tuple[list[str], str]:
    """The command lines (comments cut) and the Python snippet of the README's "Keep a
    result" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    text = readme.split("\n## Keep a result\n", 1)[1].split("\n## ", 1)[0]
    (shell,) = re.findall(r"```sh\n(.*?)```", text, re.S)
    (python,) = re.findall(r"```python\n(.*?)```", text, re.S)
    lines = [line.split("  #")[0].strip() for line in shell.splitlines() if line.strip()]
    return lines, python


def test_the_readmes_keep_a_result_section_runs_as_written(
        logged_in, key, sessions, tmp_path, artifact_root, monkeypatch, capsys):  # noqa: ANN001
    run = tmp_path / "sine-run"
    Trainer(SINE_SPEC).run(run)  # real weights: the snippet loads them
    with httpx.Client(base_url=logged_in) as http:
        job_id = succeeded_job(http, sessions, {"Authorization": f"Bearer {key}"}, SINE_SPEC,
                               run, artifact_root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines, python = readme_blocks()
    outputs = []
    for line in lines:
        program, *arguments = shlex.split(line.replace("$JOB", job_id))
        assert program == "metaserve"
        result = invoke(*arguments)
        assert result.exit_code == 0, (line, result.output)
        outputs.append(result.output)
    assert outputs == [f"models:/sine/1  job {job_id}  meta_init  @production\n",
                       f"sine: no description\n  models:/sine/1  job {job_id}  meta_init  "
                       "@production\n"]
    capsys.readouterr()
    exec(compile(python, "README.md", "exec"), {})  # noqa: S102 - the README's own snippet
    assert capsys.readouterr().out == "models:/sine/1 maml\n"
