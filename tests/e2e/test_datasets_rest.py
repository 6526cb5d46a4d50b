"""Bring your own tasks, end to end through REST on a real ``metaserve serve`` (SQLite, its own
local Ray): upload a dataset made here (30 classes × 20 images of synthetic shapes), train
MAML and ProtoNets on it by id, adapt both to a support set and get predictions; another user
gets 404 on the dataset and 403 naming a server path; the dataset cannot be deleted while a
job uses it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from metaserve.service import auth
from metaserve.service.db import make_engine, session_factory
from metaserve.workers.tasks.fewshot import split_classes
from tests import synthetic_datasets as synth
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow

FAMILY = {"name": "images", "ways": 5, "support_shots": 1, "query_shots": 5,
          "split": [0.6, 0.2, 0.2]}
COMMON = {"meta_batch_size": 4, "iterations": 20, "log_every": 10, "checkpoint_every": 20,
          "evaluation": {"every": 0, "tasks": 40},
          "model": {"name": "conv4", "filters": 16}, "outer_optimizer": {"lr": 0.003}}


def wait(client, job_id: str, timeout: float = 400) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled"} or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def test_upload_train_maml_and_protonet_by_id_adapt_and_scope(tmp_path: Path) -> None:
    images, labels = synth.shapes(classes=30, per_class=20)
    body = synth.npz_bytes(images, labels, compressed=True)
    server = ServerProcess(tmp_path).start()
    try:
        engine = make_engine(f"sqlite:///{tmp_path / '.metaserve' / 'metaserve.db'}")
        with session_factory(engine)() as session:
            _, bob_key = auth.create_key(session=session, name="bob")
        engine.dispose()
        with server.client() as admin, server.client() as bob:
            bob.headers["Authorization"] = f"Bearer {bob_key}"
            uploaded = admin.post("/v1/datasets", params={"name": "shapes"}, content=body)
            assert uploaded.status_code == 201, uploaded.text
            dataset = uploaded.json()
            assert (dataset["classes"], dataset["images"], dataset["shape"]) == (30, 600, [1, 28, 28])

            family = {**FAMILY, "dataset": dataset["id"]}
            maml = admin.post("/v1/jobs", json={**COMMON, "algorithm": {"name": "maml", "inner_lr": 0.4},
                                                "task_family": family}).json()
            protonet = admin.post("/v1/jobs", json={**COMMON, "algorithm": {"name": "protonet"},
                                                    "task_family": family}).json()
            in_use = admin.delete(f"/v1/datasets/{dataset['id']}")
            assert in_use.status_code == 409, in_use.text

            assert bob.get(f"/v1/datasets/{dataset['id']}").status_code == 404
            assert bob.delete(f"/v1/datasets/{dataset['id']}").status_code == 404
            refused = bob.post("/v1/jobs", json={"algorithm": {"name": "maml"},
                                                 "task_family": family})
            assert refused.status_code == 422
            assert [d["field"] for d in refused.json()["error"]["details"]] == ["task_family.dataset"]
            path = bob.post("/v1/jobs", json={"algorithm": {"name": "maml"},
                                              "task_family": {**FAMILY, "path": "/etc"}})
            assert path.status_code == 403
            assert [d["field"] for d in path.json()["error"]["details"]] == ["task_family.path"]

            finished = {name: wait(admin, job["id"]) for name, job in
                        (("maml", maml), ("protonet", protonet))}
            for name, job in finished.items():
                assert job["status"] == "succeeded", (name, job)

            # a 5-way 1-shot task of held-out classes, labelled by this test
            test_classes = split_classes(30, tuple(FAMILY["split"]), 0)["test"][:5].tolist()
            support = [np.flatnonzero(labels == c)[0] for c in test_classes]
            query = [i for c in test_classes for i in np.flatnonzero(labels == c)[1:6]]
            truth = [test_classes.index(int(labels[i])) for i in query]
            request = {"support_x": (images[support][:, None] / 255.0).tolist(),
                       "support_y": list(range(5)),
                       "query_x": (images[query][:, None] / 255.0).tolist()}
            for name, job in finished.items():
                adapted = admin.post(f"/v1/jobs/{job['id']}/adapt", json=request)
                assert adapted.status_code == 200, adapted.text
                result = adapted.json()
                assert (result["algorithm"], len(result["predictions"]), len(result["labels"])) == (
                    name, 25, 25)
                assert all(len(row) == 5 for row in result["predictions"])
                hits = np.mean(np.array(result["labels"]) == np.array(truth))
                assert hits > 0.4, (name, hits)  # chance: 0.2
            metrics = {m["name"]: m["value"] for m in admin.get(
                f"/v1/jobs/{finished['protonet']['id']}/metrics").json()["data"]}
            assert "test/accuracy_step0" in metrics and "test/transductive_accuracy_step0" in metrics

            assert admin.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
            assert admin.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    finally:
        server.terminate()
    assert synth.files_under(tmp_path / ".metaserve" / "uploads") == []
    assert not (tmp_path / ".metaserve" / "artifacts" / dataset["id"]).exists()
