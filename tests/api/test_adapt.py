"""``POST /v1/jobs/{id}/adapt`` on SQLite and PostgreSQL, with meta-initializations trained
for real by the engine (a few iterations) and registered as the dispatcher registers them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metaserve.api.schemas import MAX_ADAPT_VALUES
from metaserve.service import claims, job_store
from metaserve.service.orm import JobStatus
from metaserve.workers.engine import Trainer
from metaserve.service.settings import MAX_BODY_BYTES
from metaserve.workers.engine.final_artifact import adapt, load_meta_init
from tests.helpers import SINE_SPEC, WORKER, sine_task, succeeded_job

GLYPHS_SPEC = {"algorithm": {"name": "anil"},
               "task_family": {"name": "glyphs", "num_characters": 40, "ways": 3,
                               "support_shots": 1, "query_shots": 2, "image_size": 16},
               "model": {"name": "conv4", "filters": 8}, "meta_batch_size": 2, "iterations": 1,
               "evaluation": {"every": 0, "tasks": 2, "inner_steps": [1]}}


@pytest.fixture
def max_body_bytes() -> int:
    return MAX_BODY_BYTES  # adapt requests carry arrays: the server's default limit


def one_thread(compute):  # noqa: ANN001, ANN201
    """``compute()`` with one torch thread, as an adapt process computes (a sum's order, so the
    last bits, depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute()
    finally:
        torch.set_num_threads(threads)


def test_adapt_returns_the_query_predictions_of_the_jobs_recipe_as_the_offline_loader_does(
        client, sessions, alice_auth, sine_run, artifact_root) -> None:  # noqa: ANN001
    job_id = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    support_x, support_y, query_x = sine_task(0)
    body = {"support_x": support_x.tolist(), "support_y": support_y.tolist(),
            "query_x": query_x.tolist()}

    first = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=alice_auth)
    again = client.post(f"/v1/jobs/{job_id}/adapt", json={**body, "steps": 5}, headers=alice_auth)

    model, _ = load_meta_init(sine_run)
    expected = one_thread(lambda: adapt(model, support_x, support_y)(query_x).detach())
    expected_5 = one_thread(lambda: adapt(model, support_x, support_y, 5)(query_x).detach())
    assert first.status_code == 200, first.text
    assert first.json() == {"predictions": expected.tolist(), "labels": None, "classes": None,
                            "targets": None, "steps": 1, "algorithm": "maml"}
    assert again.json() == {"predictions": expected_5.tolist(), "labels": None, "classes": None,
                            "targets": None, "steps": 5, "algorithm": "maml"}
    assert len(client.app.state.adapt_pool.process_ids()) == 1  # both calls, one process


def test_zero_steps_predict_with_the_meta_initialization_itself(
        client, sessions, alice_auth, sine_run, artifact_root) -> None:  # noqa: ANN001
    job_id = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    support_x, support_y, query_x = sine_task(1)
    response = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth, json={
        "support_x": support_x.tolist(), "support_y": support_y.tolist(),
        "query_x": query_x.tolist(), "steps": 0})
    model, _ = load_meta_init(sine_run)
    assert response.json()["predictions"] == one_thread(lambda: model(query_x).detach().tolist())


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"support_x": [[1.0, 2.0]]}, "support_x", "shape [1, 2], expected [n, 1]"),
    ({"query_x": [1.0, 2.0]}, "query_x", "shape [2], expected [m, 1]"),
    ({"support_y": [[1.0], [2.0]]}, "support_y", "2 labels for 1 inputs"),
    ({"support_y": [[1.0, "a"]]}, "support_y", "expected a rectangular array of numbers"),
])
def test_arrays_that_do_not_fit_the_sine_family_are_a_422_naming_the_field(
        client, sessions, alice_auth, sine_run, artifact_root, change, field, message) -> None:  # noqa: ANN001
    job_id = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    body = {"support_x": [[0.5]], "support_y": [[0.1]], "query_x": [[0.2]], **change}
    response = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=alice_auth)
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [{"field": field, "message": message}]


def test_more_rows_than_allowed_are_a_422_and_more_numbers_a_413_both_naming_the_field(
        client, sessions, alice_auth) -> None:  # noqa: ANN001
    job_id = client.post("/v1/jobs", json=SINE_SPEC, headers=alice_auth).json()["id"]  # queued
    rows = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth, json={
        "support_x": [[0.0]] * 1001, "support_y": [[0.0]], "query_x": [[0.0]]})
    wide = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth, json={
        "support_x": [[0.0]], "support_y": [[0.0]],
        "query_x": [[0] * (MAX_ADAPT_VALUES // 1000 + 1)] * 1000})
    assert rows.status_code == 422
    assert [d["field"] for d in rows.json()["error"]["details"]] == ["support_x"]
    assert wide.status_code == 413
    assert wide.json()["error"] == {
        "code": "payload_too_large", "message": f"query_x holds more than {MAX_ADAPT_VALUES} numbers",
        "details": [{"field": "query_x", "message": f"at most {MAX_ADAPT_VALUES} numbers"}]}


def test_a_job_that_has_not_succeeded_cannot_adapt_and_another_users_job_is_404(
        client, alice_auth, bob_auth) -> None:  # noqa: ANN001
    job_id = client.post("/v1/jobs", json=SINE_SPEC, headers=alice_auth).json()["id"]
    body = {"support_x": [[0.5]], "support_y": [[0.1]], "query_x": [[0.2]]}
    queued = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=alice_auth)
    foreign = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=bob_auth)
    assert (queued.status_code, queued.json()["error"]["code"]) == (409, "not_ready")
    assert queued.json()["error"]["message"] == (
        f"job {job_id} is queued; only a succeeded job has a meta-initialization to adapt")
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (404, "not_found")


RL2_SPEC = {"algorithm": {"name": "rl2"}, "task_family": {"name": "bandit"}}


def test_a_meta_rl_job_is_a_409_that_says_to_load_its_meta_policy_with_the_sdk(
        client, sessions, alice_auth) -> None:  # noqa: ANN001
    body = {"support_x": [[0.5]], "support_y": [[0.1]], "query_x": [[0.2]]}
    job_id = client.post("/v1/jobs", json=RL2_SPEC, headers=alice_auth).json()["id"]
    queued = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=alice_auth)
    with sessions() as session:
        with session.begin():
            assert claims.claim_next_job(session=session, worker_id=WORKER, lease_s=30).id == job_id
        with session.begin():
            job_store.finish_job(session=session, job_id=job_id, worker_id=WORKER, status=JobStatus.SUCCEEDED)
    succeeded = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=alice_auth)
    for response in (queued, succeeded):
        error = response.json()["error"]
        assert (response.status_code, error["code"]) == (409, "not_adaptable")
        assert error["message"] == (
            f"job {job_id} is a meta-RL job (rl2 on bandit): its artifact is a meta-policy, which "
            "adapts by acting in a task, not on support arrays. Use the Python SDK: policy = "
            f"Client().load_meta_policy('{job_id}'), then policy.adapt(task).act(observation); "
            f"offline, load_meta_policy(DIR) on what `metaserve fetch {job_id} -o DIR` downloaded")


@pytest.fixture(scope="module")
def glyphs_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("glyphs-run")
    Trainer(GLYPHS_SPEC).run(directory)
    return directory


@pytest.mark.slow
def test_an_anil_glyphs_job_adapts_to_labelled_images_and_checks_their_shape_and_labels(
        client, sessions, alice_auth, glyphs_run, artifact_root) -> None:  # noqa: ANN001
    job_id = succeeded_job(client, sessions, alice_auth, GLYPHS_SPEC, glyphs_run, artifact_root)
    generator = torch.Generator().manual_seed(0)
    support_x, query_x = torch.rand(3, 1, 16, 16, generator=generator), torch.rand(4, 1, 16, 16)
    support_y = torch.tensor([0, 1, 2])
    body = {"support_x": support_x.tolist(), "support_y": support_y.tolist(),
            "query_x": query_x.tolist()}

    response = client.post(f"/v1/jobs/{job_id}/adapt", json=body, headers=alice_auth)
    bad_label = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth,
                            json={**body, "support_y": [0, 1, 3]})
    bad_size = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth,
                           json={**body, "query_x": torch.rand(4, 1, 28, 28).tolist()})

    model, _ = load_meta_init(glyphs_run)
    logits = one_thread(lambda: adapt(model, support_x, support_y)(query_x).detach())
    assert response.json() == {"predictions": logits.tolist(),
                               "labels": logits.argmax(dim=-1).tolist(), "classes": None,
                               "targets": None, "steps": 1, "algorithm": "anil"}
    assert bad_label.json()["error"]["details"] == [
        {"field": "support_y", "message": "class indices must be integers in [0, 3)"}]
    assert bad_size.json()["error"]["details"] == [
        {"field": "query_x", "message": "shape [4, 1, 28, 28], expected [m, 1, 16, 16]"}]


TABLE_ENTITIES, TABLE_ROWS = 30, 24


def table_csv() -> bytes:
    """30 entities × 24 rows: ``y = a_e·x1 + sin(x2) + b_e``, times 0..23, a label column."""
    rng = np.random.default_rng(0)
    entity = np.repeat(np.arange(TABLE_ENTITIES), TABLE_ROWS)
    x1, x2 = rng.normal(size=(2, len(entity)))
    a, b = rng.normal(size=(2, TABLE_ENTITIES))
    y = a[entity] * x1 + np.sin(x2) + b[entity]
    kinds = np.array(["cat", "dog", "eel"])[np.tile(np.arange(3), len(entity) // 3)]
    lines = ["entity,t,x1,x2,kind,y"] + [
        f"e{e},{t},{u!r},{v!r},{k},{w!r}" for e, t, u, v, k, w in
        zip(entity.tolist(), np.tile(np.arange(TABLE_ROWS), TABLE_ENTITIES).tolist(), x1.tolist(),
            x2.tolist(), kinds.tolist(), y.tolist())]
    return "\n".join(lines).encode()


def tabular_spec(dataset_id: str, **family) -> dict:
    return {"algorithm": {"name": "maml", "inner_lr": 0.1, "inner_steps": 2},
            "model": {"name": "mlp", "hidden": [16]}, "meta_batch_size": 4, "iterations": 3,
            "evaluation": {"every": 0, "tasks": 4, "inner_steps": [2]},
            "task_family": {"name": "tabular", "dataset": dataset_id, "task_column": "entity",
                            "target": "y", "features": ["x1", "x2"], "support_shots": 5,
                            "query_shots": 5, **family}}


@pytest.fixture
def tabular_job(client, sessions, alice_auth, artifact_root, tmp_path):  # noqa: ANN001, ANN201
    """A succeeded time-series tabular job (lags 1) on an uploaded table, trained for real."""
    from metaserve.workers.tasks.uploaded import use_dataset_store

    uploaded = client.post("/v1/datasets", params={"name": "panel"}, content=table_csv(),
                           headers=alice_auth)
    assert uploaded.status_code == 201, uploaded.text
    spec = tabular_spec(uploaded.json()["id"], time_column="t", lags=1)
    use_dataset_store(client.app.state.settings.storage_config())
    one_thread(lambda: Trainer(spec).run(tmp_path / "tabular-run"))
    job_id = succeeded_job(client, sessions, alice_auth, spec, tmp_path / "tabular-run", artifact_root)
    return job_id, tmp_path / "tabular-run"


SUPPORT_ROWS = {"x1": [0.1, -0.4, 1.2, 0.3], "x2": [1.0, 0.5, -0.2, 0.0],
                "y": [2.0, 1.5, 3.1, 2.2], "t": [0, 1, 2, 3]}
QUERY_ROWS = {"x1": [0.7, -1.0], "x2": [0.2, 0.3], "t": [5, 4]}


def test_a_tabular_job_adapts_to_raw_rows_in_any_form_as_the_offline_loader_does(
        client, alice_auth, tabular_job) -> None:  # noqa: ANN001
    job_id, run = tabular_job
    url = f"/v1/jobs/{job_id}/adapt"
    columns = client.post(url, headers=alice_auth, json={"support": SUPPORT_ROWS, "query": QUERY_ROWS})
    objects = client.post(url, headers=alice_auth, json={
        "support": [dict(zip(SUPPORT_ROWS, row)) for row in zip(*SUPPORT_ROWS.values())],
        "query": [dict(zip(QUERY_ROWS, row)) for row in zip(*QUERY_ROWS.values())]})
    in_time_order = [1, 0]  # arrays carry no time column: rows are given in time order
    arrays = client.post(url, headers=alice_auth, json={
        "support_x": [list(row) for row in zip(SUPPORT_ROWS["x1"], SUPPORT_ROWS["x2"])],
        "support_y": SUPPORT_ROWS["y"],
        "query_x": [[QUERY_ROWS["x1"][i], QUERY_ROWS["x2"][i]] for i in in_time_order]})

    model, _ = load_meta_init(run)
    expected = one_thread(lambda: model.adapt_rows(support=SUPPORT_ROWS, query=QUERY_ROWS))
    assert columns.status_code == 200, columns.text
    assert columns.json() == {**expected, "steps": 2, "algorithm": "maml"}
    assert expected["targets"] == ["y"] and len(expected["predictions"]) == 2
    assert objects.json() == columns.json()
    assert [arrays.json()["predictions"][i] for i in in_time_order] == columns.json()["predictions"]


def test_raw_rows_that_do_not_fit_the_tabular_job_are_a_422_naming_the_column(
        client, alice_auth, tabular_job) -> None:  # noqa: ANN001
    job_id, _ = tabular_job
    cases = [  # (support, query, the field named)
        ({**SUPPORT_ROWS, "x3": [0.0] * 4}, QUERY_ROWS, "support.x3"),
        ({name: v for name, v in SUPPORT_ROWS.items() if name != "y"}, QUERY_ROWS, "support.y"),
        (SUPPORT_ROWS, {"x1": [0.7], "X2": [0.2], "t": [5]}, "query.x2"),
        (SUPPORT_ROWS, {**QUERY_ROWS, "t": [3, 4]}, "query.t"),
        ({**SUPPORT_ROWS, "x1": [0.1, None, 1.2, 0.3]}, QUERY_ROWS, "support.x1"),
    ]
    for support, query, field in cases:
        response = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth,
                               json={"support": support, "query": query})
        assert response.status_code == 422, response.text
        assert [d["field"] for d in response.json()["error"]["details"]] == [field]


def test_rows_and_arrays_together_or_rows_for_a_sine_job_are_a_422(
        client, sessions, alice_auth, sine_run, artifact_root) -> None:  # noqa: ANN001
    job_id = succeeded_job(client, sessions, alice_auth, SINE_SPEC, sine_run, artifact_root)
    both = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth, json={
        "support": {"x": [1.0]}, "query": {"x": [1.0]}, "support_x": [[1.0]]})
    rows = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth, json={
        "support": {"x": [1.0]}, "query": {"x": [1.0]}})
    assert both.status_code == 422 and rows.status_code == 422
    assert rows.json()["error"]["details"][0]["field"] == "support"


def test_named_columns_above_the_number_bound_are_a_413(client, alice_auth) -> None:  # noqa: ANN001
    job_id = client.post("/v1/jobs", json=SINE_SPEC, headers=alice_auth).json()["id"]
    columns = {f"c{i}": [0.0] * 1000 for i in range(MAX_ADAPT_VALUES // 1000 + 1)}
    response = client.post(f"/v1/jobs/{job_id}/adapt", headers=alice_auth,
                           json={"support": columns, "query": {"c0": [0.0]}})
    assert response.status_code == 413
    assert response.json()["error"]["details"] == [
        {"field": "support", "message": f"at most {MAX_ADAPT_VALUES} numbers"}]
