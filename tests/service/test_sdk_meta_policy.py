"""The SDK reads a job's artifact kind from its files: ``load_meta_policy`` downloads and loads a
meta-RL job's meta-policy (or a fetched directory, offline), ``load_meta_init`` and
``load_meta_policy`` on a job of the other kind name the loader to use (a stub server: the
REST path for real is tests/e2e/test_rl_contract.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from metaserve import client as sdk
from metaserve.client import Client, MetaserveClientError
from metaserve.workers.engine.final_artifact import META_POLICY, export_artifact
from metaserve.workers.rl.maml_rl import MAMLRL
from metaserve.workers.spec import JobSpec

MAML = {"algorithm": {"name": "maml", "inner_lr": 0.5,
                      "policy_gradient": {"episodes_per_task": 2, "hidden": [8], "normalize_actions": True}},
        "task_family": {"name": "nav2d", "horizon": 10}, "meta_batch_size": 2, "iterations": 1}


@pytest.fixture(autouse=True)
def isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METASERVE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("METASERVE_URL", raising=False)
    monkeypatch.delenv("METASERVE_API_KEY", raising=False)


@pytest.fixture
def meta_policy_dir(tmp_path: Path) -> Path:
    spec = JobSpec.model_validate(MAML)
    tensors, described = MAMLRL(spec).meta_policy()
    directory = tmp_path / "written"
    directory.mkdir()
    export_artifact(directory, kind=META_POLICY, tensors=tensors, architecture=described["architecture"],
                    recipe=described["recipe"], task_family=spec.task_family.model_dump(mode="json"),
                    evaluation={}, spec=spec.model_dump(mode="json"), iteration=1)
    return directory


def stub_server(files: dict[str, dict[str, bytes]], requests: list[str]) -> httpx.MockTransport:
    """``GET /v1/jobs/{id}/artifacts[/{name}]`` of jobs ``files`` (job id → name → bytes)."""

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request.url.path)
        parts = request.url.path.strip("/").split("/")  # v1 jobs ID artifacts [NAME]
        job = files[parts[2]]
        if len(parts) == 4:
            listed = [{"name": name, "size": len(data), "sha256": "0" * 64,
                       "media_type": "application/octet-stream"} for name, data in job.items()]
            return httpx.Response(200, json={"data": listed})
        return httpx.Response(200, content=job[parts[4]])

    return httpx.MockTransport(handle)


def test_load_meta_policy_downloads_a_meta_rl_jobs_files_once_and_reads_its_kind(
        tmp_path: Path, meta_policy_dir: Path) -> None:
    written = {path.name: path.read_bytes() for path in meta_policy_dir.iterdir()}
    files = {"RLJOB": {**written, "checkpoint.json": b"{}"}}
    requests: list[str] = []
    with Client("http://stub", "ms_key", transport=stub_server(files, requests)) as client:
        assert client.artifact_kind("RLJOB") == "meta_policy"
        policy = client.load_meta_policy("RLJOB", cache_dir=tmp_path / "cache")
        again = client.load_meta_policy({"id": "RLJOB"}, cache_dir=tmp_path / "cache")
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [
        "meta_policy.json", "meta_policy.safetensors"]
    assert requests.count("/v1/jobs/RLJOB/artifacts/meta_policy.safetensors") == 1  # cached after
    assert json.loads((tmp_path / "cache" / "meta_policy.json").read_text())["kind"] == "meta_policy"
    assert policy.algorithm == again.algorithm == "maml"
    task = policy.sample_tasks(1, seed=0)[0]
    assert policy.adapt(task).act([0.0, 0.0]).shape == (2,)


def test_a_job_of_the_other_kind_is_a_client_error_naming_the_loader_to_use(
        tmp_path: Path, meta_policy_dir: Path) -> None:
    files = {"RLJOB": {path.name: path.read_bytes() for path in meta_policy_dir.iterdir()},
             "SINEJOB": {"meta_init.safetensors": b"x", "meta_init.json": b"{}"},
             "QUEUED": {}}
    with Client("http://stub", "ms_key", transport=stub_server(files, [])) as client:
        with pytest.raises(MetaserveClientError) as rl_as_init:
            client.load_meta_init("RLJOB", cache_dir=tmp_path / "a")
        with pytest.raises(MetaserveClientError) as init_as_rl:
            client.load_meta_policy("SINEJOB", cache_dir=tmp_path / "b")
        assert client.artifact_kind("QUEUED") is None
    assert str(rl_as_init.value) == ("job RLJOB's artifact is a meta_policy (meta_policy.safetensors, "
                                     "meta_policy.json), not a meta_init: load it with load_meta_policy")
    assert str(init_as_rl.value) == ("job SINEJOB's artifact is a meta_init (meta_init.safetensors, "
                                     "meta_init.json), not a meta_policy: load it with load_meta_init")


def test_a_fetched_directory_loads_offline_and_a_meta_init_loader_names_what_it_holds(
        meta_policy_dir: Path) -> None:
    with Client() as offline:  # no server, no API key
        policy = offline.load_meta_policy(meta_policy_dir)
    assert policy.recipe["algorithm"] == "maml" and sdk.load_meta_policy(meta_policy_dir).recipe == policy.recipe
    with pytest.raises(MetaserveClientError) as refused:
        sdk.load_meta_init(meta_policy_dir)
    assert str(refused.value) == (f"{meta_policy_dir} has no meta_init.safetensors, meta_init.json; "
                                  "it holds a meta_policy (load it with load_meta_policy)")
    with pytest.raises(MetaserveClientError) as empty:
        sdk.load_meta_policy(meta_policy_dir / "nothing")
    assert str(empty.value) == f"{meta_policy_dir / 'nothing'} has no meta_policy.safetensors, meta_policy.json"
