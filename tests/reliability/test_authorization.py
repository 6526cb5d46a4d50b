"""Authorization: every ``/v1`` route refuses a missing or wrong key with 401; another
user's job is a 404 on every route that names a job (the same answer as a job that does
not exist, so ids leak nothing); an admin sees everyone's; an API key is stored hashed,
never logged and never returned after its creation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from metaserve.service.ids import new_id
from tests.helpers import TWO_LINE_SPEC, bearer
from tests.server_process import ServerProcess, metaserve_executable

UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "Missing or invalid API key.",
                          "details": []}}
ADAPT_BODY = {"support_x": [[0.0]], "support_y": [[0.0]], "query_x": [[0.5]]}
BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer ms_not_a_key"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
    {"Authorization": "ms_not_a_key"},
]


def v1_requests(client: TestClient, job_id: str) -> list[tuple[str, str, dict]]:
    """(method, path, request kwargs) of every /v1 operation of the app's OpenAPI document,
    valid but for the key."""
    requests = []
    for template, operations in client.app.openapi()["paths"].items():
        if not template.startswith("/v1"):
            continue
        name = "meta_init.json" if template.startswith("/v1/jobs") else "kept"
        path = (template.replace("{job_id}", job_id).replace("{name}", name)
                .replace("{key_id}", "1"))
        for method in sorted(operations):
            kwargs: dict = {}
            if template == "/v1/jobs" and method == "post":
                kwargs = {"json": TWO_LINE_SPEC}
            elif template.endswith("/adapt"):
                kwargs = {"json": ADAPT_BODY}
            requests.append((method.upper(), path, kwargs))
    return requests


def job_requests(job_id: str) -> list[tuple[str, str, dict]]:
    """Every request that names one job."""
    return [
        ("GET", f"/v1/jobs/{job_id}", {}),
        ("GET", f"/v1/jobs/{job_id}/metrics", {}),
        ("GET", f"/v1/jobs/{job_id}/artifacts", {}),
        ("GET", f"/v1/jobs/{job_id}/artifacts/meta_init.json", {}),
        ("GET", f"/v1/jobs/{job_id}/events", {}),
        ("GET", f"/v1/jobs/{job_id}/logs", {}),
        ("GET", f"/v1/jobs/{job_id}/logs?follow=true", {}),
        ("POST", f"/v1/jobs/{job_id}/adapt", {"json": ADAPT_BODY}),
        ("POST", f"/v1/jobs/{job_id}/cancel", {}),
    ]


def test_every_v1_route_refuses_a_missing_or_wrong_key_with_401(client, alice_job):
    requests = v1_requests(client, alice_job)
    assert {(method, path.replace(alice_job, "{id}")) for method, path, _ in requests} == {
        ("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/stream"),
        ("GET", "/v1/jobs/{id}"),
        ("POST", "/v1/jobs/{id}/cancel"), ("GET", "/v1/algorithms"),
        ("GET", "/v1/task-families"), ("GET", "/v1/jobs/{id}/metrics"),
        ("GET", "/v1/jobs/{id}/artifacts"), ("GET", "/v1/jobs/{id}/artifacts/meta_init.json"),
        ("GET", "/v1/jobs/{id}/events"), ("POST", "/v1/jobs/{id}/adapt"),
        ("GET", "/v1/keys"), ("DELETE", "/v1/keys/1"),
        ("POST", "/v1/datasets"), ("GET", "/v1/datasets"), ("GET", "/v1/datasets/{dataset_id}"),
        ("DELETE", "/v1/datasets/{dataset_id}"), ("GET", "/v1/jobs/{id}/logs"),
        ("POST", "/v1/sweeps"), ("GET", "/v1/sweeps"), ("GET", "/v1/sweeps/{sweep_id}"),
        ("GET", "/v1/sweeps/{sweep_id}/trials"), ("POST", "/v1/sweeps/{sweep_id}/cancel"),
        ("GET", "/v1/sweeps/{sweep_id}/importance"),
        ("GET", "/v1/networks"), ("GET", "/v1/models"), ("POST", "/v1/models"),
        ("GET", "/v1/models/kept"), ("DELETE", "/v1/models/kept"),
        ("GET", "/v1/models/kept/versions"), ("POST", "/v1/models/kept/versions"),
        ("GET", "/v1/models/kept/versions/{version}"),
        ("DELETE", "/v1/models/kept/versions/{version}"),
        ("GET", "/v1/models/kept/aliases/{alias}"), ("PUT", "/v1/models/kept/aliases/{alias}"),
        ("DELETE", "/v1/models/kept/aliases/{alias}"),
        ("GET", "/v1/models/kept/versions/{version}/artifacts/{artifact}"),
        ("GET", "/v1/models/kept/aliases/{alias}/artifacts/{artifact}")}
    refused = {}
    for method, path, kwargs in requests:
        for headers in BAD_CREDENTIALS:
            response = client.request(method, path, headers=headers, **kwargs)
            refused[(method, path, str(headers))] = (
                response.status_code, response.json(), response.headers.get("www-authenticate"))
    assert refused == {request: (401, UNAUTHORIZED, "Bearer") for request in refused}
    assert len(refused) == len(requests) * len(BAD_CREDENTIALS)


def not_found_body(job_id: str) -> dict:
    return {"error": {"code": "not_found", "message": "Job not found.",
                      "details": [{"field": "job_id", "message": job_id}]}}


def test_another_users_job_is_404_on_every_route_like_a_missing_job(client, alice_job, bob_key):
    missing = new_id()
    answers = {}
    for job_id in (alice_job, missing):
        for method, path, kwargs in job_requests(job_id):
            response = client.request(method, path, headers=bearer(bob_key), **kwargs)
            answers[(method, path.replace(job_id, "{id}"), job_id == missing)] = (
                response.status_code, response.json() if response.status_code == 404 else None)
    expected = {}
    for job_id in (alice_job, missing):
        for method, path, _ in job_requests(job_id):
            expected[(method, path.replace(job_id, "{id}"), job_id == missing)] = (
                404, not_found_body(job_id))
    assert answers == expected


def test_another_users_job_is_left_untouched_by_their_cancel(client, sessions, alice_key,
                                                            bob_key):
    job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=bearer(alice_key)).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(bob_key)).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", headers=bearer(alice_key)).json()["status"] == "queued"
    assert client.get("/v1/jobs", headers=bearer(bob_key)).json() == {"data": [], "total": 0,
                                                                      "next_cursor": None}


def test_an_admin_sees_and_reads_every_users_job(client, alice_job, bob_key, admin_key):
    bobs = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=bearer(bob_key)).json()["id"]
    admin = bearer(admin_key)
    listed = client.get("/v1/jobs", headers=admin).json()["data"]
    assert sorted(job["id"] for job in listed) == sorted([alice_job, bobs])
    statuses = {}
    for method, path, kwargs in job_requests(alice_job):
        statuses[path.replace(alice_job, "{id}")] = client.request(method, path, headers=admin,
                                                                   **kwargs).status_code
    assert statuses == {
        "/v1/jobs/{id}": 200, "/v1/jobs/{id}/metrics": 200, "/v1/jobs/{id}/artifacts": 200,
        "/v1/jobs/{id}/artifacts/meta_init.json": 200, "/v1/jobs/{id}/events": 200,
        "/v1/jobs/{id}/logs": 200, "/v1/jobs/{id}/logs?follow=true": 200,
        "/v1/jobs/{id}/adapt": 409,  # found, but cancelled: no meta-initialization
        "/v1/jobs/{id}/cancel": 409}  # found, but already cancelled
    assert client.post(f"/v1/jobs/{bobs}/cancel", headers=admin).json()["status"] == "cancelled"


@pytest.mark.server
def test_api_keys_are_never_logged_nor_returned_nor_stored_in_clear(tmp_path: Path) -> None:
    """A live ``metaserve serve`` with its default logging: every route is called with the
    admin key, a second user's key (created by ``metaserve keys create``) and wrong keys;
    no key appears in the server's log, in any response, or in the database file."""
    server = ServerProcess(tmp_path, METASERVE_DISPATCHER="false").start()
    try:
        created = subprocess.run([metaserve_executable(), "keys", "create", "carol"],
                                 cwd=tmp_path, env=server.env, capture_output=True, text=True,
                                 check=True)
        carol_key = next(word for word in created.stdout.split() if word.startswith("ms_"))
        keys = [server.admin_key, carol_key, "ms_wrong_key_that_must_not_be_logged"]
        responses: list[httpx.Response] = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC,
                                 headers=bearer(carol_key)).json()["id"]
            client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(carol_key))
            for key in keys:
                for method, path, kwargs in job_requests(job_id) + [
                        ("GET", "/v1/jobs", {}), ("POST", "/v1/jobs", {"json": TWO_LINE_SPEC}),
                        ("POST", "/v1/jobs", {"json": {"algorithm": {"name": "nope"}}}),
                        ("GET", "/v1/algorithms", {}), ("GET", "/v1/task-families", {}),
                        ("GET", "/healthz", {}), ("GET", "/readyz", {}),
                        ("GET", "/openapi.json", {})]:
                    responses.append(client.request(method, path, headers=bearer(key), **kwargs))
    finally:
        server.terminate()
    statuses = {response.status_code for response in responses}
    assert {200, 201, 401, 404, 409, 422} <= statuses
    log = server.log_path.read_text()
    assert "GET /v1/jobs" in log  # the access log is on, so the check below means something
    database = (tmp_path / ".metaserve" / "metaserve.db").read_bytes()
    for key in keys:
        secret = key.removeprefix("ms_")
        assert secret not in log
        assert secret.encode() not in database
        assert [str(r.request.url) for r in responses if secret.encode() in r.content] == []
