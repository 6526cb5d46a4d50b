"""The API on an S3 artifact store (a real moto server on 127.0.0.1): downloads stream the
stored bytes, adaptation loads the meta-initialization from the bucket, and ``/readyz`` says
when the store does not answer."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service import artifacts, claims, job_store
from metaserve.service.orm import JobStatus
from metaserve.service.settings import MAX_BODY_BYTES, Settings
from metaserve.workers.engine import Trainer
from metaserve.workers.engine.final_artifact import adapt, load_meta_init
from metaserve.workers.object_store import CHECKPOINT_DIRECTORY, ArtifactStore, open_store
from tests.moto_s3 import MotoS3, free_port

SPEC = {"algorithm": {"name": "maml", "inner_steps": 1}, "task_family": {"name": "sine"},
        "iterations": 2, "evaluation": {"every": 0, "tasks": 2, "inner_steps": [1]}}
WORKER = "worker-1"


def s3_settings(db_url: str, moto_s3: MotoS3, **change: str) -> Settings:
    values = {"database_url": db_url, "dispatcher": False, "max_body_bytes": MAX_BODY_BYTES,
              "artifact_root": f"s3://{moto_s3.bucket}/{uuid.uuid4().hex}",
              "s3_endpoint_url": moto_s3.endpoint_url, "s3_access_key_id": moto_s3.access_key_id,
              "s3_secret_access_key": moto_s3.secret_access_key}
    return Settings(**{**values, **change})


@pytest.fixture
def settings(db_url: str, moto_s3: MotoS3) -> Settings:
    return s3_settings(db_url, moto_s3)


@pytest.fixture
def client(engine, settings: Settings) -> Iterator[TestClient]:  # noqa: ANN001
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def store(settings: Settings) -> ArtifactStore:
    return open_store(settings.storage_config())


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sine-run")
    Trainer(SPEC).run(directory)
    return directory


def published_job(client: TestClient, sessions, auth: dict[str, str], store: ArtifactStore,  # noqa: ANN001
                  paths: list[Path], *, succeed: bool = False) -> str:
    """A job of ``auth`` whose ``paths`` are put in the store and registered, as the
    dispatcher does."""
    job_id = client.post("/v1/jobs", json=SPEC, headers=auth).json()["id"]
    with sessions() as session:
        with session.begin():
            assert claims.claim_next_job(session=session, worker_id=WORKER, lease_s=30).id == job_id
        for described in store.put(job_id, paths, attempt=1):
            with session.begin():
                job_store.add_artifact(session=session, job_id=job_id, name=described.name,
                                       size=described.size, sha256=described.sha256,
                                       media_type=described.media_type)
        if succeed:
            with session.begin():
                job_store.finish_job(session=session, job_id=job_id, worker_id=WORKER,
                                     status=JobStatus.SUCCEEDED)
    return job_id


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_downloads_through_s3_are_the_stored_bytes(client, sessions, alice_auth, store,  # noqa: ANN001
                                                   tmp_path: Path) -> None:
    tensors = write(tmp_path / "out" / "meta_init.safetensors", os.urandom(3 * (1 << 20) + 5))
    recipe = write(tmp_path / "out" / "meta_init.json", json.dumps({"algorithm": "maml"}).encode())
    checkpoint = write(tmp_path / "out" / CHECKPOINT_DIRECTORY / "checkpoint.json", b'{"iteration": 3}')
    job_id = published_job(client, sessions, alice_auth, store, [tensors, recipe, checkpoint])

    listed = client.get(f"/v1/jobs/{job_id}/artifacts", headers=alice_auth).json()["data"]
    assert {item["name"]: item["sha256"] for item in listed} == {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (tensors, recipe, checkpoint)}
    for path, media_type in ((tensors, "application/octet-stream"), (recipe, "application/json"),
                             (checkpoint, "application/json")):
        response = client.get(f"/v1/jobs/{job_id}/artifacts/{path.name}", headers=alice_auth)
        assert response.status_code == 200, response.text
        assert response.content == path.read_bytes()
        assert response.headers["content-length"] == str(path.stat().st_size)
        assert response.headers["content-type"] == media_type
        assert response.headers["content-disposition"] == f'attachment; filename="{path.name}"'


def test_registered_artifact_missing_from_the_bucket_is_404(client, sessions, alice_auth, store,  # noqa: ANN001
                                                            tmp_path: Path) -> None:
    job_id = published_job(client, sessions, alice_auth, store,
                           [write(tmp_path / "meta_init.json", b"{}")])
    store.delete(job_id)
    response = client.get(f"/v1/jobs/{job_id}/artifacts/meta_init.json", headers=alice_auth)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Artifact file is missing."


def test_unregistered_object_in_the_bucket_is_not_served(client, sessions, alice_auth, store,  # noqa: ANN001
                                                         tmp_path: Path) -> None:
    job_id = published_job(client, sessions, alice_auth, store,
                           [write(tmp_path / "meta_init.json", b"{}")])
    store.put(job_id, [write(tmp_path / "secret.json", b"not listed")])
    response = client.get(f"/v1/jobs/{job_id}/artifacts/secret.json", headers=alice_auth)
    assert response.status_code == 404
    assert b"not listed" not in response.content


def test_adapt_loads_the_meta_init_from_s3(client, sessions, alice_auth, store, sine_run) -> None:  # noqa: ANN001
    job_id = published_job(client, sessions, alice_auth, store,
                           [sine_run / "meta_init.safetensors", sine_run / "meta_init.json"],
                           succeed=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, generator=generator) * 10 - 5
    y = 2.0 * torch.sin(x - 0.5)
    body = {"support_x": x[:10].tolist(), "support_y": y[:10].tolist(), "query_x": x[10:].tolist()}
    response = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=alice_auth)
    assert response.status_code == 200, response.text
    model, _ = load_meta_init(sine_run)
    assert response.json()["predictions"] == adapt(model, x[:10], y[:10])(x[10:]).detach().tolist()


def test_adapt_refuses_a_meta_init_that_does_not_match_its_record(client, sessions, alice_auth,  # noqa: ANN001
                                                                  store, sine_run, tmp_path) -> None:  # noqa: ANN001
    job_id = published_job(client, sessions, alice_auth, store,
                           [sine_run / "meta_init.safetensors", sine_run / "meta_init.json"],
                           succeed=True)
    # Republished by the same attempt: the store's current meta-init is no longer the recorded one.
    store.put(job_id, [write(tmp_path / "meta_init.safetensors", b"replaced behind our back")],
              attempt=1)
    body = {"support_x": [[0.0]], "support_y": [[0.0]], "query_x": [[0.0]]}
    response = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=alice_auth)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_unavailable"


def test_readyz_is_ok_when_the_store_answers(client) -> None:  # noqa: ANN001
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "dispatcher": "off"}


def test_readyz_is_503_when_the_store_refuses_the_credentials(engine, db_url, moto_s3) -> None:  # noqa: ANN001
    settings = s3_settings(db_url, moto_s3, s3_access_key_id="AKIAWRONGWRONGWRONG0")
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"] == {
        "code": "not_ready",
        "message": f"storage unreachable: artifact store {settings.artifact_root} at "
                   f"{moto_s3.endpoint_url}: wrong credentials (InvalidAccessKeyId: The AWS Access "
                   "Key Id you provided does not exist in our records.)", "details": []}


def test_readyz_is_503_when_the_endpoint_is_down_and_downloads_are_503(  # noqa: ANN001
        engine, db_url, moto_s3, sessions, alice_auth) -> None:  # noqa: ANN001
    endpoint = f"http://127.0.0.1:{free_port()}"
    settings = s3_settings(db_url, moto_s3, s3_endpoint_url=endpoint)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["error"]["message"] == (
            f"storage unreachable: artifact store {settings.artifact_root} at {endpoint}: "
            "endpoint unreachable (connection refused)")
        job_id = client.post("/v1/jobs", json=SPEC, headers=alice_auth).json()["id"]
        with sessions.begin() as session:
            job_store.add_artifact(session=session, job_id=job_id, name="meta_init.json", size=2,
                                   sha256="0" * 64, media_type="application/json")
        download = client.get(f"/v1/jobs/{job_id}/artifacts/meta_init.json", headers=alice_auth)
        assert download.status_code == 503
        assert download.json()["error"]["code"] == "storage_unavailable"
        assert endpoint not in download.text  # the store's address stays in the log


def test_readyz_checks_the_store_at_most_every_few_seconds(client, monkeypatch) -> None:  # noqa: ANN001
    calls = []
    store = artifacts.get_store(client.app.state.settings.storage_config())
    monkeypatch.setattr(store, "check", lambda: calls.append(1))
    for _ in range(5):
        assert client.get("/readyz").status_code == 200
    assert len(calls) <= 1
