"""NUL and other control characters (C0, DEL, C1) in names, ids, headers and query values:
422 naming the field on SQLite and PostgreSQL (PostgreSQL answered 500 to a NUL before,
SQLite stored it), nothing stored."""

from __future__ import annotations

import pytest

from tests.helpers import TWO_LINE_SPEC, bearer

# PostgreSQL refuses a NUL in text where SQLite stores it: both dialects.
pytestmark = pytest.mark.dialects

CONTROLS = ["\x00", "\x1b[2J", "\x07", "\n", "\x7f", "\x9b31m"]


def error_fields(response) -> list[tuple[str, str | None]]:  # noqa: ANN001
    return [(d["field"], d.get("in")) for d in response.json()["error"]["details"]]


@pytest.mark.parametrize("control", CONTROLS)
def test_control_character_in_a_job_name_is_422_naming_it(client, alice_key, control):
    response = client.post("/v1/jobs", json={**TWO_LINE_SPEC, "name": f"a{control}b"},
                           headers=bearer(alice_key))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "name"
    assert client.get("/v1/jobs", headers=bearer(alice_key)).json()["data"] == []


def test_control_character_in_a_dataset_path_is_422_naming_it(client, alice_key):
    spec = {"algorithm": {"name": "maml"},
            "task_family": {"name": "images", "path": "datasets/omni\x00glot"}}
    response = client.post("/v1/jobs", json=spec, headers=bearer(alice_key))
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == ["task_family.path"]


@pytest.mark.parametrize("route", [
    ("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/metrics"), ("GET", "/v1/jobs/{}/artifacts"),
    ("GET", "/v1/jobs/{}/events"), ("POST", "/v1/jobs/{}/cancel"), ("POST", "/v1/jobs/{}/adapt"),
])
def test_nul_in_a_job_id_is_422_naming_job_id_on_every_job_route(client, alice_key, route):
    method, template = route
    for raw in ("01ABC%00DEF", "%1b%5b2J", "x%7f"):
        response = client.request(method, template.format(raw), headers=bearer(alice_key))
        assert response.status_code == 422, (raw, response.text)
        assert error_fields(response) == [("job_id", "path")]


def test_nul_in_an_artifact_name_is_422_naming_it(client, alice_job, alice_key):
    response = client.get(f"/v1/jobs/{alice_job}/artifacts/meta%00init.json",
                          headers=bearer(alice_key))
    assert response.status_code == 422
    assert error_fields(response)[0][1] == "path"
    assert error_fields(response)[0][0] in {"name", "path"}


def test_control_character_in_an_idempotency_key_is_422_naming_the_header(client, alice_key):
    response = client.post("/v1/jobs", json=TWO_LINE_SPEC,
                           headers={**bearer(alice_key), "Idempotency-Key": "k\x01ey"})
    assert response.status_code == 422
    assert error_fields(response) == [("idempotency-key", "header")]
    assert client.get("/v1/jobs", headers=bearer(alice_key)).json()["data"] == []


def test_control_character_in_a_query_value_is_422_naming_the_parameter(client, alice_key):
    response = client.get("/v1/jobs?status=queued%00", headers=bearer(alice_key))
    assert (response.status_code, error_fields(response)) == (422, [("status", "query")])
    response = client.get("/v1/jobs?cursor=%1b", headers=bearer(alice_key))
    assert (response.status_code, error_fields(response)) == (422, [("cursor", "query")])


def test_printable_unicode_names_are_still_accepted(client, alice_key):
    response = client.post("/v1/jobs", json={**TWO_LINE_SPEC, "name": "sinus – Ωmega 正弦 \t"},
                           headers=bearer(alice_key))
    assert response.status_code == 422  # a tab is a control character too
    response = client.post("/v1/jobs", json={**TWO_LINE_SPEC, "name": "sinus – Ωmega 正弦"},
                           headers=bearer(alice_key))
    assert response.status_code == 201
