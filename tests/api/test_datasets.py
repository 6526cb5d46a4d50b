"""``/v1/datasets``: upload (npz, zip and tar trees), owner scoping, deletion, limits, hostile
archives, and the spec's dataset reference at submit."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service.settings import Settings
from metaserve.workers.object_store import StorageConfig
from metaserve.workers.tasks.uploaded import read_canonical
from tests import synthetic_datasets as synth

SMALL = dict(classes=6, per_class=4)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=db_url, dispatcher=False, data_dir=tmp_path / "state",
                    artifact_root=tmp_path / "artifacts", max_body_bytes=16 * 1024,
                    dataset_max_upload_bytes=4 * 2**20, dataset_max_images=500,
                    dataset_max_image_side=64)


@pytest.fixture
def api(engine, settings: Settings) -> Iterator[TestClient]:  # noqa: ANN001
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def upload(api: TestClient, auth: dict, body: bytes, name: str = "shapes"):  # noqa: ANN201
    return api.post("/v1/datasets", params={"name": name}, content=body, headers=auth)


def left_on_disk(settings: Settings) -> list[str]:
    return synth.files_under(settings.upload_dir) + synth.files_under(Path(settings.artifact_root))


def stored(settings: Settings, dataset_id: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return read_canonical(Path(settings.artifact_root) / dataset_id)


def test_an_npz_upload_is_stored_in_the_canonical_layout_and_described(
        api, settings, alice_auth) -> None:  # noqa: ANN001
    images, labels = synth.shapes(**SMALL)
    body = synth.npz_bytes(images, labels, compressed=True)
    response = upload(api, alice_auth, body)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert {k: dataset[k] for k in ("name", "format", "classes", "images", "shape", "bytes",
                                    "status")} == {
        "name": "shapes", "format": "npz", "classes": 6, "images": 24, "shape": [1, 28, 28],
        "bytes": len(body), "status": "ready"}
    import hashlib
    assert dataset["sha256"] == hashlib.sha256(body).hexdigest()
    assert response.headers["location"] == f"/v1/datasets/{dataset['id']}"
    stored_images, stored_labels, names = stored(settings, dataset["id"])
    assert torch.equal(stored_images, torch.from_numpy(images)[:, None])
    assert names == [str(c) for c in range(6)]
    assert torch.equal(stored_labels, torch.from_numpy(labels))
    assert synth.files_under(settings.upload_dir) == []
    assert api.get(f"/v1/datasets/{dataset['id']}", headers=alice_auth).json() == dataset
    assert api.get("/v1/datasets", headers=alice_auth).json() == {"data": [dataset],
                                                                  "next_cursor": None}


@pytest.mark.parametrize("kind", ["zip-imagefolder", "tar-omniglot", "targz-imagefolder"])
def test_archives_of_image_trees_are_converted_to_the_same_pixels(
        api, settings, alice_auth, kind) -> None:  # noqa: ANN001
    images, labels = synth.shapes(**SMALL)
    members = synth.tree_members(images, labels, omniglot="omniglot" in kind)
    members["data/__MACOSX/._junk"] = b"resource fork"  # passed over, as .DS_Store
    del members["data/__MACOSX/._junk"]
    body = {"zip-imagefolder": lambda: synth.zip_bytes(members),
            "tar-omniglot": lambda: synth.tar_bytes(members),
            "targz-imagefolder": lambda: synth.tar_bytes(members, mode="w:gz")}[kind]()
    response = upload(api, alice_auth, body)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["format"], dataset["classes"], dataset["images"], dataset["shape"]) == (
        "omniglot" if "omniglot" in kind else "imagefolder", 6, 24, [1, 28, 28])
    stored_images, stored_labels, names = stored(settings, dataset["id"])
    assert torch.equal(stored_images, torch.from_numpy(images)[:, None])
    expected_names = sorted({(f"alphabet{c % 2}/char{c:02d}" if "omniglot" in kind
                              else f"class{c:02d}") for c in range(6)})
    assert names == expected_names
    assert [names[i] for i in stored_labels.tolist()] == [
        (f"alphabet{c % 2}/char{c:02d}" if "omniglot" in kind else f"class{c:02d}")
        for c in labels.tolist()]


def test_another_user_gets_404_and_cannot_delete_or_name_the_dataset(
        api, alice_auth, bob_auth) -> None:  # noqa: ANN001
    dataset = upload(api, alice_auth, synth.npz_bytes(*synth.shapes(**SMALL))).json()
    for method in ("GET", "DELETE"):
        response = api.request(method, f"/v1/datasets/{dataset['id']}", headers=bob_auth)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"
    assert api.get("/v1/datasets", headers=bob_auth).json()["data"] == []
    spec = {"algorithm": {"name": "maml"},
            "task_family": {"name": "images", "dataset": dataset["id"], "ways": 2,
                            "query_shots": 1, "split": [0.34, 0.33, 0.33]}}
    response = api.post("/v1/jobs", json=spec, headers=bob_auth)
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == ["task_family.dataset"]
    assert api.get("/v1/jobs", headers=bob_auth).json()["data"] == []
    assert api.post("/v1/jobs", json=spec, headers=alice_auth).status_code == 201


def test_a_server_path_is_refused_for_a_user_key_and_accepted_for_an_admin(
        api, alice_auth, admin_auth, tmp_path) -> None:  # noqa: ANN001
    spec = {"algorithm": {"name": "maml"},
            "task_family": {"name": "images", "path": str(tmp_path / "omniglot")}}
    response = api.post("/v1/jobs", json=spec, headers=alice_auth)
    assert response.status_code == 403, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == ["task_family.path"]
    assert api.get("/v1/jobs", headers=alice_auth).json()["data"] == []
    assert api.post("/v1/jobs", json=spec, headers=admin_auth).status_code == 201


def test_a_spec_names_exactly_one_of_dataset_and_path(api, alice_auth) -> None:  # noqa: ANN001
    for family in ({"name": "images"},
                   {"name": "images", "dataset": "ds_" + "0" * 26, "path": "x"},
                   {"name": "images", "dataset": "../etc"}):
        response = api.post("/v1/jobs", json={"algorithm": {"name": "maml"},
                                              "task_family": family}, headers=alice_auth)
        assert response.status_code == 422, response.text
        assert {d["field"].split(".")[0] for d in response.json()["error"]["details"]} == {
            "task_family"}


def test_delete_is_refused_while_a_queued_job_uses_the_dataset(
        api, settings, alice_auth) -> None:  # noqa: ANN001
    dataset = upload(api, alice_auth, synth.npz_bytes(*synth.shapes(**SMALL))).json()
    spec = {"algorithm": {"name": "maml"},
            "task_family": {"name": "images", "dataset": dataset["id"], "ways": 2,
                            "query_shots": 1, "split": [0.34, 0.33, 0.33]}}
    job = api.post("/v1/jobs", json=spec, headers=alice_auth).json()
    response = api.delete(f"/v1/datasets/{dataset['id']}", headers=alice_auth)
    assert response.status_code == 409, response.text
    assert response.json()["error"]["details"] == [{"field": "jobs", "message": job["id"]}]
    assert api.get(f"/v1/datasets/{dataset['id']}", headers=alice_auth).status_code == 200
    api.post(f"/v1/jobs/{job['id']}/cancel", headers=alice_auth)
    assert api.delete(f"/v1/datasets/{dataset['id']}", headers=alice_auth).status_code == 204
    assert api.get(f"/v1/datasets/{dataset['id']}", headers=alice_auth).status_code == 404
    assert left_on_disk(settings) == []


def test_an_upload_above_the_size_cap_is_413_naming_body_and_nothing_is_kept(
        api, settings, alice_auth) -> None:  # noqa: ANN001
    too_big = bytes(settings.dataset_max_upload_bytes + 1)
    declared = upload(api, alice_auth, too_big)
    assert declared.status_code == 413
    assert [d["field"] for d in declared.json()["error"]["details"]] == ["body"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(5):
            yield bytes(2**20)

    streamed = api.post("/v1/datasets", content=chunks(), headers=alice_auth)
    assert streamed.status_code == 413
    assert [d["field"] for d in streamed.json()["error"]["details"]] == ["body"]
    assert left_on_disk(settings) == []
    assert api.get("/v1/datasets", headers=alice_auth).json()["data"] == []


@pytest.mark.parametrize("case,field", [
    ("too many images", "images"),
    ("side too large", "shape"),
    ("member side too large", "member"),
])
def test_dataset_limits_are_422_naming_the_field(api, settings, alice_auth, case, field) -> None:  # noqa: ANN001
    if case == "too many images":
        images, labels = synth.shapes(classes=26, per_class=20)  # 520 > 500
        body = synth.npz_bytes(images, labels)
    elif case == "side too large":
        body = synth.npz_bytes(np.zeros((4, 65, 30), np.uint8), np.array([0, 0, 1, 1]))
    else:
        members = synth.tree_members(*synth.shapes(**SMALL))
        members["data/class00/big.png"] = synth.png(np.zeros((80, 20), np.uint8))
        body = synth.zip_bytes(members)
    response = upload(api, alice_auth, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "limit_exceeded"
    assert field in [d["field"] for d in error["details"]]
    assert left_on_disk(settings) == []


def _hostile(kind: str) -> tuple[bytes, str]:
    """An archive of ``kind`` and the member its refusal must name."""
    members = synth.tree_members(*synth.shapes(**SMALL))
    if kind == "absolute path":
        return synth.tar_bytes({**members, "/etc/evil.png": synth.png(np.zeros((8, 8), np.uint8))}), "/etc/evil.png"
    if kind == "dot-dot":
        return synth.zip_bytes({**members, "data/../../evil.png": synth.png(np.zeros((8, 8), np.uint8))}), "data/../../evil.png"
    if kind == "symlink in tar":
        return synth.tar_with_link(members, "data/class00/link.png", "/etc/passwd"), "data/class00/link.png"
    if kind == "hard link in tar":
        return synth.tar_with_link(members, "data/class00/hard.png", "/etc/passwd", hard=True), "data/class00/hard.png"
    if kind == "symlink in zip":
        return synth.zip_with_symlink(members, "data/class00/link.png", "/etc/passwd"), "data/class00/link.png"
    if kind == "non-image member":
        return synth.zip_bytes({**members, "data/class00/run.sh": b"#!/bin/sh\n"}), "data/class00/run.sh"
    if kind == "image that is not one":
        return synth.zip_bytes({**members, "data/class00/fake.png": b"not a png at all"}), "data/class00/fake.png"
    if kind == "zip bomb":
        return synth.zip_bomb("data/class00/bomb.png"), "data/class00/bomb.png"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["absolute path", "dot-dot", "symlink in tar", "hard link in tar",
                                  "symlink in zip", "non-image member", "image that is not one",
                                  "zip bomb"])
def test_hostile_archives_are_refused_naming_the_member_and_nothing_is_left_on_disk(
        api, settings, alice_auth, kind) -> None:  # noqa: ANN001
    body, member = _hostile(kind)
    response = upload(api, alice_auth, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset"
    assert {"field": "member", "message": member} in [
        {"field": d["field"], "message": d["message"]} for d in error["details"]], error
    assert member in error["message"]
    assert left_on_disk(settings) == []
    assert api.get("/v1/datasets", headers=alice_auth).json()["data"] == []


def test_a_body_that_is_no_archive_is_422_naming_body(api, settings, alice_auth) -> None:  # noqa: ANN001
    response = upload(api, alice_auth, b"just some text, not an archive")
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["error"]["details"]] == ["body"]
    assert left_on_disk(settings) == []


def test_an_npz_with_pickled_labels_is_refused(api, settings, alice_auth) -> None:  # noqa: ANN001
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((4, 8, 8), np.uint8),
             labels=np.array([{"a": 1}, 2, 3, 4], dtype=object))
    response = upload(api, alice_auth, buffer.getvalue())
    assert response.status_code == 422, response.text
    assert "pickles are never read" in response.json()["error"]["message"]
    assert left_on_disk(settings) == []


def test_the_workers_read_an_uploaded_dataset_by_id(api, settings, alice_auth) -> None:  # noqa: ANN001
    from metaserve.workers.spec import ImagesSpec
    from metaserve.workers.tasks.images import ImagesFamily
    from metaserve.workers.tasks.uploaded import use_dataset_store

    images, labels = synth.shapes(**SMALL)
    dataset = upload(api, alice_auth, synth.npz_bytes(images, labels)).json()
    use_dataset_store(StorageConfig(root=str(settings.artifact_root)))
    family = ImagesFamily(ImagesSpec(dataset=dataset["id"], ways=2, support_shots=1,
                                     query_shots=1, split=(0.34, 0.33, 0.33)))
    assert family.dataset.class_names == tuple(str(c) for c in range(6))
    by_class = torch.from_numpy(images)[np.argsort(labels, kind="stable")][:, None]
    assert torch.equal(family.dataset.images, by_class)
    batch = family.sample(seed=0, split="train", iteration=0, task_indices=[0, 1])
    assert batch.support_x.shape == (2, 2, 1, 28, 28)
    assert json.loads((Path(settings.artifact_root) / dataset["id"] / "dataset.json")
                      .read_text())["class_names"] == [str(c) for c in range(6)]


@pytest.mark.parametrize(("family", "field", "message"), [
    ({"ways": 5}, "task_family.ways",
     "val split has 4 classes; ways=5 needs at least 5: upload more classes or change split "
     "(27 classes split [0.7, 0.15, 0.15] with split_seed 0)"),
    ({"ways": 3, "support_shots": 2, "query_shots": 3}, "task_family.support_shots",
     "train split has 0 classes with at least 5 images (support_shots 2 + query_shots 3); "
     "ways=3 needs 3: classes have 4 to 4 images; lower the shots or upload more images per "
     "class"),
])
def test_an_image_spec_the_dataset_cannot_serve_is_422_at_submit_and_no_job(
        api, alice_auth, family, field, message) -> None:  # noqa: ANN001
    dataset = upload(api, alice_auth, synth.npz_bytes(*synth.shapes(classes=27, per_class=4)))
    assert dataset.json()["split_sizes"] == {"classes": {"train": 19, "val": 4, "test": 4}}
    assert dataset.json()["usable_for"] == [
        "images 4-way with support_shots + query_shots up to 4 (default split)"]
    response = api.post("/v1/jobs", headers=alice_auth, json={
        "algorithm": {"name": "maml"},
        "task_family": {"name": "images", "dataset": dataset.json()["id"], **family}})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [{"field": field, "message": message}]
    assert api.get("/v1/jobs", headers=alice_auth).json()["data"] == []


def test_a_dataset_recorded_before_its_metadata_is_checked_when_the_job_runs(
        api, sessions, alice_auth) -> None:  # noqa: ANN001
    """Rows from before migration 0010 have kind images and meta null: submit cannot check
    them, says so, and accepts the spec (the family checks it when the job starts)."""
    from metaserve.service.orm import Dataset, User

    with sessions() as session, session.begin():
        owner = session.query(User).filter_by(name="alice").one()
        session.add(Dataset(id="ds_" + "1" * 26, owner_id=owner.id, name="old", format="npz",
                            classes=3, images=6, shape=[1, 28, 28], bytes=1, sha256="0" * 64,
                            status="ready"))
    shown = api.get("/v1/datasets/ds_" + "1" * 26, headers=alice_auth).json()
    assert (shown["kind"], shown["meta"], shown["usable_for"], shown["unusable_reason"]) == (
        "images", None, None, "uploaded before datasets were described; specs naming it are "
                              "checked when the job runs")
    response = api.post("/v1/jobs", headers=alice_auth, json={
        "algorithm": {"name": "maml"},
        "task_family": {"name": "images", "dataset": "ds_" + "1" * 26, "ways": 5}})
    assert response.status_code == 201, response.text
