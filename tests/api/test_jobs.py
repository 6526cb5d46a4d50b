from __future__ import annotations

import pytest

from metaserve.service import claims
from metaserve.workers.spec import ALGORITHMS, TASK_FAMILIES, JobSpec

TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}


def test_v1_routes_need_a_valid_key(client):
    for headers in ({}, {"Authorization": "Bearer ms_wrong"}, {"Authorization": "Basic eDp5"}):
        response = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"error": {"code": "unauthorized",
                                             "message": "Missing or invalid API key.",
                                             "details": []}}
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/algorithms").status_code == 401


def test_create_two_line_job_then_get_it_queued(client, alice_auth):
    response = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=alice_auth)
    assert response.status_code == 201
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["spec"] == {**JobSpec.model_validate(TWO_LINE_SPEC).model_dump(mode="json"),
                           "name": "maml-sine"}
    fetched = client.get(f"/v1/jobs/{job['id']}", headers=alice_auth)
    assert fetched.status_code == 200
    detail = fetched.json()
    [event] = detail.pop("status_history")
    assert {key: event[key] for key in ("status", "attempt", "message", "error")} == {
        "status": "queued", "attempt": 0, "message": None, "error": None}
    assert event["time"] == job["created_at"]
    # This server runs no dispatcher: the queued job says what it waits for.
    assert detail.pop("message") == ("waiting for a dispatcher: this server runs none "
                                     "(METASERVE_DISPATCHER=false); a `metaserve dispatcher` "
                                     "process claims it")
    assert detail == {key: value for key, value in job.items()
                      if key not in ("message", "status_history")}
    assert {key: job[key] for key in ("name", "status", "attempt", "max_attempts", "progress",
                                      "message", "error", "started_at", "finished_at",
                                      "duration_s", "latest_metrics", "trial_count",
                                      "driver_of_sweep", "status_history")} == {
        "name": "maml-sine", "status": "queued", "attempt": 0, "max_attempts": 3,
        "progress": {}, "message": None, "error": None, "started_at": None,
        "finished_at": None, "duration_s": None, "latest_metrics": {}, "trial_count": None,
        "driver_of_sweep": None, "status_history": None}


def test_unknown_algorithm_is_422_naming_algorithm(client, alice_auth):
    response = client.post("/v1/jobs", json={"algorithm": {"name": "nope"}}, headers=alice_auth)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert {(d["field"], d["type"]) for d in error["details"]} == {
        ("algorithm", "union_tag_invalid"), ("task_family", "missing")}
    assert error["message"] == "invalid request: algorithm, task_family"


def test_bad_nested_fields_are_named_by_dotted_path(client, alice_auth):
    body = {"algorithm": {"name": "maml", "inner_lr": -1},
            "task_family": {"name": "sine", "support_shots": 0},
            "model": {"name": "mlp", "hidden": [40, 0]}, "colour": "red"}
    response = client.post("/v1/jobs", json=body, headers=alice_auth)
    assert response.status_code == 422
    assert sorted(d["field"] for d in response.json()["error"]["details"]) == [
        "algorithm.inner_lr", "colour", "model.hidden.1", "task_family.support_shots"]


def test_invalid_json_is_422_in_the_error_shape(client, alice_auth):
    response = client.post("/v1/jobs", content=b"{not json",
                           headers={**alice_auth, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_body_above_limit_is_413(client, alice_auth):
    body = {**TWO_LINE_SPEC, "name": "x" * client.app.state.settings.max_body_bytes}
    response = client.post("/v1/jobs", json=body, headers=alice_auth)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.dialects
def test_idempotency_key_replay_is_200_and_other_body_409(client, alice_auth):
    headers = {**alice_auth, "Idempotency-Key": "abc"}
    first = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=headers)
    replay = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=headers)
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json() == first.json()
    conflict = client.post("/v1/jobs", json={**TWO_LINE_SPEC, "iterations": 7}, headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    listed = client.get("/v1/jobs", headers=alice_auth).json()
    assert [job["id"] for job in listed["data"]] == [first.json()["id"]]


def test_cancel_queued_is_immediate_running_goes_cancelling_terminal_409(client, sessions,
                                                                         alice_auth):
    queued = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=alice_auth).json()
    response = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=alice_auth)
    assert (response.status_code, response.json()["status"]) == (200, "cancelled")
    again = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=alice_auth)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "invalid_transition"

    running = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=alice_auth).json()
    with sessions.begin() as session:
        assert claims.claim_next_job(session=session, worker_id="w1", lease_s=30).id == running["id"]
    response = client.post(f"/v1/jobs/{running['id']}/cancel", headers=alice_auth)
    assert (response.status_code, response.json()["status"]) == (200, "cancelling")


def test_another_users_job_is_404_and_admin_sees_all(client, alice_auth, bob_auth, admin_auth):
    alices = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=alice_auth).json()
    bobs = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=bob_auth).json()
    for method, path in (("GET", f"/v1/jobs/{alices['id']}"),
                         ("POST", f"/v1/jobs/{alices['id']}/cancel")):
        response = client.request(method, path, headers=bob_auth)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert [j["id"] for j in client.get("/v1/jobs", headers=bob_auth).json()["data"]] == [
        bobs["id"]]
    assert client.get(f"/v1/jobs/{alices['id']}", headers=admin_auth).status_code == 200
    assert [j["id"] for j in client.get("/v1/jobs", headers=admin_auth).json()["data"]] == [
        bobs["id"], alices["id"]]


@pytest.mark.dialects
def test_list_jobs_pages_newest_first_and_filters_status(client, alice_auth):
    ids = [client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=alice_auth).json()["id"]
           for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice_auth)
    first = client.get("/v1/jobs", params={"limit": 2}, headers=alice_auth).json()
    second = client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]},
                        headers=alice_auth).json()
    assert [j["id"] for j in first["data"] + second["data"]] == ids[::-1]
    assert second["next_cursor"] is None
    assert (first["total"], second["total"]) == (3, 3)
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=alice_auth).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]
    assert cancelled["total"] == 1
    by_status = client.get("/v1/jobs", params=[("sort", "status"), ("order", "asc"),
                                               ("status", "queued"), ("status", "cancelled")],
                           headers=alice_auth).json()
    assert [j["id"] for j in by_status["data"]] == [ids[0], ids[1], ids[2]]


@pytest.mark.parametrize("params, field", [({"limit": 101}, "limit"),
                                           ({"status": "paused"}, "status"),
                                           ({"status": "queued,paused"}, "status"),
                                           ({"sort": "colour"}, "sort"),
                                           ({"sort": "param:a..b"}, "sort"),
                                           ({"order": "up"}, "order"),
                                           ({"trials": "hide"}, "trials")])
def test_list_jobs_rejects_bad_query_naming_the_parameter(client, alice_auth, params, field):
    response = client.get("/v1/jobs", params=params, headers=alice_auth)
    assert response.status_code == 422
    assert [(d["field"], d["in"]) for d in response.json()["error"]["details"]] == [
        (field, "query")]


def test_catalogs_list_every_algorithm_and_task_family_with_bounds(client, alice_auth):
    algorithms = client.get("/v1/algorithms", headers=alice_auth).json()
    families = client.get("/v1/task-families", headers=alice_auth).json()
    assert [a["name"] for a in algorithms] == list(ALGORITHMS)
    assert [f["name"] for f in families] == list(TASK_FAMILIES)
    maml = {p["name"]: p for p in algorithms[0]["parameters"]}
    assert maml["inner_lr"] == {"name": "inner_lr", "type": "number", "default": 0.01,
                                "bounds": {"exclusiveMinimum": 0.0, "maximum": 100.0},
                                "description": "Inner-loop SGD step size α."}
    assert maml["inner_steps"]["bounds"] == {"minimum": 0, "maximum": 100}
    assert set(maml) == set(ALGORITHMS["maml"].model_fields) - {"name"}


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok", "dispatcher": "off"}
    assert client.get("/openapi.json").json()["info"]["title"] == "metaserve"


def test_unknown_route_is_404_in_the_error_shape(client, alice_auth):
    response = client.get("/v1/nope", headers=alice_auth)
    assert response.json() == {"error": {"code": "not_found", "message": "Not Found",
                                         "details": []}}


@pytest.mark.parametrize(("spec", "field"), [
    ({"iterations": 10_000_000, "meta_batch_size": 4096}, "iterations"),
    ({"model": {"name": "mlp", "hidden": [8192] * 16}}, "model"),
    ({"meta_batch_size": 1024, "resources": {"workers": 1024, "cpus_per_worker": 0.001}},
     "resources.workers"),
    ({"task_family": {"name": "glyphs", "ways": 100, "support_shots": 1000,
                      "query_shots": 1000, "image_size": 224}}, "task_family"),
])
def test_a_job_above_the_cost_limits_is_422_naming_the_field_and_stores_nothing(
        client, alice_auth, spec, field):  # noqa: ANN001
    response = client.post("/v1/jobs", json={**TWO_LINE_SPEC, **spec}, headers=alice_auth)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "limit_exceeded"
    assert error["message"].startswith(f"the job is larger than this server accepts: {field}")
    detail = next(d for d in error["details"] if d["field"] == field)
    assert "more than the cap of" in detail["message"] and "(METASERVE_MAX_" in detail["message"]
    assert client.get("/v1/jobs", headers=alice_auth).json()["data"] == []
