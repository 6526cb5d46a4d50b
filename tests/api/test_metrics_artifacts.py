"""``GET /v1/jobs/{id}/metrics`` and ``/artifacts[/{name}]`` on SQLite and PostgreSQL: values
written through the service layer (as the dispatcher writes them) and files written under a
real ``ARTIFACT_ROOT``, read back through the API."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, load_file, save_file
from sqlalchemy import select

from metaserve.api.schemas import MetricPointPublic, MetricsPublic, metrics_response
from metaserve.service import artifacts, job_store, jobs
from metaserve.service.orm import Metric
from metaserve.workers.spec import JobSpec
from metaserve.workers.engine.trainer import CHECKPOINT_DIRECTORY
from metaserve.workers.object_store import StorageConfig, open_store

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}


def submit(client: TestClient, auth: dict[str, str]) -> str:
    response = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=auth)
    assert response.status_code == 201
    return response.json()["id"]


def register(sessions, job_id: str, path: Path) -> None:  # noqa: ANN001
    """Record ``path`` (a file under the job's directory) as the dispatcher does."""
    described = artifacts.describe(path)
    with sessions.begin() as session:
        job_store.add_artifact(session=session, job_id=job_id, name=described.name,
                               size=described.size, sha256=described.sha256,
                               media_type=described.media_type)


@pytest.fixture
def finished_job(client, sessions, alice_auth, artifact_root) -> tuple[str, dict]:  # noqa: ANN001
    """Alice's job with a checkpoint and a final meta-init on disk and in the database;
    returns its id and the saved tensors."""
    job_id = submit(client, alice_auth)
    directory = artifacts.job_dir(artifact_root, job_id)
    (directory / CHECKPOINT_DIRECTORY).mkdir(parents=True)
    tensors = {"layers.0.weight": torch.randn(40, 1), "layers.0.bias": torch.zeros(40)}
    save_file(tensors, directory / "meta_init.safetensors", metadata={"format": "pt"})
    (directory / "meta_init.json").write_text(json.dumps({"algorithm": "maml"}))
    checkpoint = directory / CHECKPOINT_DIRECTORY / "checkpoint.safetensors"
    save_file({"step": torch.tensor([3])}, checkpoint)
    for path in (directory / "meta_init.safetensors", directory / "meta_init.json", checkpoint):
        register(sessions, job_id, path)
    return job_id, tensors


# --------------------------------------------------------------------------- metrics


def write_metrics(sessions, job_id: str,  # noqa: ANN001
                  rows: list[tuple[int, str, float]]) -> None:
    with sessions.begin() as session:
        job_store.add_metrics(session=session, job_id=job_id, rows=rows)


def points(response) -> list[tuple[int, str, float | None]]:  # noqa: ANN001
    return [(p["step"], p["name"], p["value"]) for p in response.json()["data"]]


def test_metrics_of_a_new_job_are_empty(client, alice_auth):
    job_id = submit(client, alice_auth)
    response = client.get(f"/v1/jobs/{job_id}/metrics", headers=alice_auth)
    assert response.status_code == 200
    assert response.json() == {"data": [], "next_since_step": None}


@pytest.mark.dialects
def test_metrics_come_back_by_step_then_name_with_time(client, sessions, alice_auth):
    job_id = submit(client, alice_auth)
    write_metrics(sessions, job_id, [(2, "loss", 0.5), (1, "loss", 0.9), (1, "acc", 0.1),
                                     (2, "acc", 0.4)])
    response = client.get(f"/v1/jobs/{job_id}/metrics", headers=alice_auth)
    assert response.status_code == 200
    assert points(response) == [(1, "acc", 0.1), (1, "loss", 0.9), (2, "acc", 0.4),
                                (2, "loss", 0.5)]
    assert response.json()["next_since_step"] is None
    assert all(isinstance(p["time"], str) and p["time"][:2] == "20"
               for p in response.json()["data"])


def test_metrics_name_filters_one_series(client, sessions, alice_auth):
    job_id = submit(client, alice_auth)
    write_metrics(sessions, job_id, [(step, name, step / 10) for step in range(5)
                                     for name in ("meta_train/loss", "tasks_per_s")])
    response = client.get(f"/v1/jobs/{job_id}/metrics",
                          params={"name": "tasks_per_s", "since_step": 2}, headers=alice_auth)
    assert points(response) == [(3, "tasks_per_s", 0.3), (4, "tasks_per_s", 0.4)]


@pytest.mark.dialects
def test_metrics_pages_by_since_step_keep_steps_whole(client, sessions, alice_auth):
    job_id = submit(client, alice_auth)
    rows = [(step, name, float(step)) for step in range(1, 8) for name in ("a", "b", "c")]
    write_metrics(sessions, job_id, rows)
    seen, since_step, pages = [], None, []
    while True:
        params = {"limit": 5} | ({} if since_step is None else {"since_step": since_step})
        response = client.get(f"/v1/jobs/{job_id}/metrics", params=params, headers=alice_auth)
        assert response.status_code == 200
        pages.append(len(response.json()["data"]))
        seen += points(response)
        since_step = response.json()["next_since_step"]
        if since_step is None:
            break
    # 5 values would cut step 2 (a, b | c): each page holds one whole step of 3 values
    assert pages == [3, 3, 3, 3, 3, 3, 3]
    assert seen == sorted(rows)


def test_metrics_step_with_more_values_than_limit_comes_whole(client, sessions, alice_auth):
    job_id = submit(client, alice_auth)
    write_metrics(sessions, job_id, [(0, "a", 1.0), (0, "b", 2.0), (0, "c", 3.0), (1, "a", 4.0)])
    first = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 2}, headers=alice_auth)
    assert first.json()["next_since_step"] == 0
    assert points(first) == [(0, "a", 1.0), (0, "b", 2.0), (0, "c", 3.0)]
    rest = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 2, "since_step": 0},
                      headers=alice_auth)
    assert rest.json() == {"data": [rest.json()["data"][0]], "next_since_step": None}
    assert points(rest) == [(1, "a", 4.0)]


@pytest.mark.dialects
def test_metrics_non_finite_values_are_null(client, sessions, alice_auth):
    job_id = submit(client, alice_auth)
    write_metrics(sessions, job_id, [(1, "loss", math.nan), (2, "loss", math.inf)])
    response = client.get(f"/v1/jobs/{job_id}/metrics", headers=alice_auth)
    assert response.status_code == 200
    assert points(response) == [(1, "loss", None), (2, "loss", None)]


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"), ({"limit": "x"}, "limit"),
    ({"since_step": -1}, "since_step"), ({"since_step": "1.5"}, "since_step"),
    ({"name": ""}, "name"), ({"name": "n" * 201}, "name"),
])
def test_metrics_query_out_of_range_is_422_naming_it(client, alice_auth, params, field):
    job_id = submit(client, alice_auth)
    response = client.get(f"/v1/jobs/{job_id}/metrics", params=params, headers=alice_auth)
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["message"]) == ("validation_error", f"invalid request: {field}")
    assert [(d["field"], d["in"]) for d in error["details"]] == [(field, "query")]


def test_metrics_limit_bounds_are_accepted(client, sessions, alice_auth):
    job_id = submit(client, alice_auth)
    write_metrics(sessions, job_id, [(1, "a", 1.0), (2, "a", 2.0)])
    for limit, expected in ((1, 1), (10_000, 2)):
        response = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": limit},
                              headers=alice_auth)
        assert len(response.json()["data"]) == expected


def test_metrics_of_another_users_job_are_404(client, sessions, alice_auth, bob_auth):
    job_id = submit(client, alice_auth)
    write_metrics(sessions, job_id, [(1, "loss", 1.0)])
    response = client.get(f"/v1/jobs/{job_id}/metrics", headers=bob_auth)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert response.json()["error"]["message"] == "Job not found."


def test_metrics_of_any_job_for_an_admin_and_404_for_a_missing_one(client, sessions, alice_auth,
                                                                   admin_auth):
    job_id = submit(client, alice_auth)
    write_metrics(sessions, job_id, [(1, "loss", 1.0), (1, "acc", 0.5)])
    response = client.get(f"/v1/jobs/{job_id}/metrics", headers=admin_auth)
    assert points(response) == [(1, "acc", 0.5), (1, "loss", 1.0)]
    empty = submit(client, alice_auth)
    assert client.get(f"/v1/jobs/{empty}/metrics", headers=admin_auth).json() == {
        "data": [], "next_since_step": None}
    for auth in (admin_auth, alice_auth):
        assert client.get("/v1/jobs/0NOSUCHJOB/metrics", headers=auth).status_code == 404


@pytest.mark.dialects
def test_a_metrics_page_leaves_its_pooled_connection_transactional(engine, sessions):
    """The page reads in autocommit; the connection it used goes back to the pool as it came,
    so the next session's writes are a transaction again (a rollback undoes them)."""
    from metaserve.service.orm import Job
    from tests.helpers import make_user

    user, _ = make_user(sessions, "carol")
    with sessions() as session:
        job, _ = jobs.submit_job(session=session, owner=user, spec=JobSpec.model_validate(
            TWO_LINE_SPEC))
    write_metrics(sessions, job.id, [(1, "loss", 1.0)])
    for _ in range(3):  # more than a pool's worth of checkouts on SQLite's small pool
        with sessions() as session:
            page, _ = jobs.get_metrics_page(session=session, job_id=job.id, owner=user)
            assert [row.value for row in page] == [1.0]
            assert session.connection().get_isolation_level() != "AUTOCOMMIT"
    with sessions() as session:
        session.get(Job, job.id).name = "renamed"
        session.flush()
        session.rollback()
    with sessions() as session:
        assert session.get(Job, job.id).name != "renamed"


def reference_body(page, next_since_step) -> bytes:  # noqa: ANN001
    """The page as the route built it before it skipped the models: a model per value."""
    return MetricsPublic(data=[MetricPointPublic.model_validate(row) for row in page],
                         next_since_step=next_since_step).model_dump_json().encode()


def test_metrics_response_bytes_equal_the_models(sessions):
    """The route's one-call serialization is byte for byte what the pydantic models make:
    non-finite values null, naive and aware times, large steps, non-ASCII names."""
    naive, aware = datetime(2026, 11, 30, 9, 5, 1, 123456), datetime(2026, 1, 2, tzinfo=UTC)
    rows = [SimpleNamespace(step=step, name=name, value=value, created_at=time)
            for step, name, value, time in [
                (0, "loss", 0.1, naive), (1, "loss", math.nan, aware), (2, "é/λ", math.inf, naive),
                (3, "a\"b", -math.inf, aware), (2**62, "x", None, naive), (5, "y", -0.0, naive),
                (6, "z", 1e-310, naive), (7, "w", 12345678901234567.0, aware)]]
    for next_since_step in (None, 0, 2**62):
        assert (metrics_response(rows, next_since_step).body
                == reference_body(rows, next_since_step))
    assert metrics_response([], None).body == reference_body([], None)


def test_metrics_pages_bytes_equal_the_models(client, sessions, alice_auth):
    """Every page the route serves equals the models' bytes for the same rows read as ORM
    objects, with and without a name, across whole-step cuts."""
    job_id = submit(client, alice_auth)
    write_metrics(sessions, job_id, [(step, name, step / 7) for step in range(1, 30)
                                     for name in ("a", "b", "c")] + [(30, "a", math.nan)])
    for name in (None, "b"):
        since_step = None
        while True:
            params = {"limit": 7} | ({} if since_step is None else {"since_step": since_step})
            params |= {} if name is None else {"name": name}
            response = client.get(f"/v1/jobs/{job_id}/metrics", params=params, headers=alice_auth)
            assert response.headers["content-type"] == "application/json"
            with sessions() as session:
                orm = list(session.scalars(
                    select(Metric).where(Metric.job_id == job_id,
                                         *([] if name is None else [Metric.name == name]),
                                         Metric.step > (-1 if since_step is None else since_step))
                    .order_by(Metric.step, Metric.name)))
            data = response.json()["data"]
            expected = orm[:len(data)]
            assert response.content == reference_body(expected, response.json()["next_since_step"])
            since_step = response.json()["next_since_step"]
            if since_step is None:
                assert len(data) == len(orm)
                break


# --------------------------------------------------------------------------- artifacts


def test_artifacts_list_names_sizes_and_sha256(client, alice_auth, artifact_root, finished_job):
    job_id, _ = finished_job
    response = client.get(f"/v1/jobs/{job_id}/artifacts", headers=alice_auth)
    assert response.status_code == 200
    directory = artifacts.job_dir(artifact_root, job_id)
    expected = [artifacts.describe(path) for path in (
        directory / CHECKPOINT_DIRECTORY / "checkpoint.safetensors",
        directory / "meta_init.json", directory / "meta_init.safetensors")]
    assert [{key: item[key] for key in ("name", "size", "sha256", "media_type")}
            for item in response.json()["data"]] == [
        {"name": e.name, "size": e.size, "sha256": e.sha256, "media_type": e.media_type}
        for e in expected]
    assert [e.media_type for e in expected] == [
        "application/octet-stream", "application/json", "application/octet-stream"]
    assert all(item["created_at"] for item in response.json()["data"])


def test_meta_init_downloads_and_loads_with_safetensors(client, alice_auth, tmp_path,
                                                        finished_job):
    job_id, tensors = finished_job
    response = client.get(f"/v1/jobs/{job_id}/artifacts/meta_init.safetensors",
                          headers=alice_auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == (
        'attachment; filename="meta_init.safetensors"')
    downloaded = tmp_path / "downloaded.safetensors"
    downloaded.write_bytes(response.content)
    loaded = load_file(downloaded)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)


def test_json_and_checkpoint_artifacts_download(client, alice_auth, finished_job):
    job_id, _ = finished_job
    meta = client.get(f"/v1/jobs/{job_id}/artifacts/meta_init.json", headers=alice_auth)
    assert meta.status_code == 200
    assert meta.headers["content-type"] == "application/json"
    assert meta.json() == {"algorithm": "maml"}
    checkpoint = client.get(f"/v1/jobs/{job_id}/artifacts/checkpoint.safetensors",
                            headers=alice_auth)
    assert checkpoint.status_code == 200
    assert torch.equal(load(checkpoint.content)["step"], torch.tensor([3]))


@pytest.mark.parametrize("name", [
    "../x", "..%2Fmeta_init.safetensors", "%2e%2e%2fsecret.txt", "%252e%252e%252fsecret.txt",
    "..%5Csecret.txt", "..\\secret.txt", "%2Fetc%2Fpasswd", "%2F..%2Fsecret.txt",
    "checkpoint%2Fcheckpoint.safetensors", "checkpoint", "%2e%2e", "%2e",
    "secret.txt", "META_INIT.SAFETENSORS", "meta_init",
])
def test_download_of_anything_but_a_listed_name_is_404(client, alice_auth, artifact_root,
                                                        finished_job, name):
    job_id, _ = finished_job
    (artifact_root / "secret.txt").write_text("not yours")
    (artifacts.job_dir(artifact_root, job_id) / "secret.txt").write_text("not listed")
    response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=alice_auth)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert b"not yours" not in response.content and b"not listed" not in response.content


@pytest.mark.dialects
def test_a_name_with_a_nul_byte_is_422_naming_it_and_serves_nothing(client, alice_auth,
                                                                    finished_job):
    job_id, _ = finished_job
    response = client.get(f"/v1/jobs/{job_id}/artifacts/meta_init.safetensors%00",
                          headers=alice_auth)
    assert response.status_code == 422
    assert [detail["field"] for detail in response.json()["error"]["details"]] == ["name"]


@pytest.mark.parametrize("name", [".", "..", "checkpoint", "", "/", "../secret.txt",
                                  "checkpoint/checkpoint.safetensors"])
def test_store_opens_only_plain_names_of_the_job(artifact_root, finished_job, name):
    """``.`` and ``..`` cannot be sent in a URL (clients remove dot segments), so they are
    checked here, with names no database would hold."""
    job_id, _ = finished_job
    (artifact_root / "secret.txt").write_text("not yours")
    store = open_store(StorageConfig(root=str(artifact_root)))
    with pytest.raises(ValueError, match="not an artifact file name"):
        store.open(job_id, name)
    directory = artifacts.job_dir(artifact_root, job_id)
    size, chunks = store.open(job_id, "meta_init.json")
    assert b"".join(chunks) == (directory / "meta_init.json").read_bytes()
    size, chunks = store.open(job_id, "checkpoint.safetensors")
    assert b"".join(chunks) == (directory / CHECKPOINT_DIRECTORY / "checkpoint.safetensors").read_bytes()


def test_absolute_path_as_name_is_404(client, alice_auth, artifact_root, finished_job):
    job_id, _ = finished_job
    secret = artifact_root / "secret.txt"
    secret.write_text("not yours")
    response = client.get(f"/v1/jobs/{job_id}/artifacts/{secret}", headers=alice_auth)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_registered_name_whose_file_is_missing_is_404(client, alice_auth, artifact_root,
                                                      finished_job):
    job_id, _ = finished_job
    (artifacts.job_dir(artifact_root, job_id) / "meta_init.json").unlink()
    response = client.get(f"/v1/jobs/{job_id}/artifacts/meta_init.json", headers=alice_auth)
    assert response.status_code == 404
    assert response.json() == {"error": {
        "code": "not_found", "message": "Artifact file is missing.",
        "details": [{"field": "job_id", "message": job_id},
                    {"field": "name", "message": "meta_init.json"}]}}


def test_registered_traversal_name_never_leaves_the_job_directory(client, sessions, alice_auth,
                                                                  artifact_root, finished_job):
    """Even a bad name in the database (written by a buggy runner) reaches no other file."""
    job_id, _ = finished_job
    (artifact_root / "secret.txt").write_text("not yours")
    with sessions.begin() as session:
        job_store.add_artifact(session=session, job_id=job_id, name="../secret.txt", size=9,
                               sha256="0" * 64, media_type="text/plain")
    response = client.get(f"/v1/jobs/{job_id}/artifacts/..%2Fsecret.txt", headers=alice_auth)
    assert response.status_code == 404
    assert b"not yours" not in response.content


def test_symlinked_artifact_is_404(client, sessions, alice_auth, artifact_root, finished_job):
    job_id, _ = finished_job
    secret = artifact_root / "secret.txt"
    secret.write_text("not yours")
    (artifacts.job_dir(artifact_root, job_id) / "link.json").symlink_to(secret)
    with sessions.begin() as session:
        job_store.add_artifact(session=session, job_id=job_id, name="link.json", size=9,
                               sha256="0" * 64, media_type="application/json")
    response = client.get(f"/v1/jobs/{job_id}/artifacts/link.json", headers=alice_auth)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Artifact file is missing."


def test_another_users_artifacts_are_404(client, bob_auth, finished_job):
    job_id, _ = finished_job
    for path in (f"/v1/jobs/{job_id}/artifacts",
                 f"/v1/jobs/{job_id}/artifacts/meta_init.safetensors"):
        response = client.get(path, headers=bob_auth)
        assert response.status_code == 404
        assert response.json()["error"] == {"code": "not_found", "message": "Job not found.",
                                            "details": [{"field": "job_id", "message": job_id}]}


def test_artifacts_of_unknown_job_are_404(client, alice_auth):
    for path in ("/v1/jobs/nope/artifacts", "/v1/jobs/nope/artifacts/meta_init.json",
                 "/v1/jobs/nope/metrics"):
        assert client.get(path, headers=alice_auth).status_code == 404


def test_checkpoint_directory_matches_the_trainers():
    assert artifacts.CHECKPOINT_DIRECTORY == CHECKPOINT_DIRECTORY
