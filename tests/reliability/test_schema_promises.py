"""The OpenAPI document's own promises, checked against the app: every secured operation
documents the 401 it answers without a key (the catalog routes did not), every operation the
422 of a control character, every body the 413 and the 422 of malformed JSON; an empty
``cursor=`` is the first page (it was a 400); ``OPTIONS`` answers 204 with ``Allow`` (it was
405 without one); a method a path does not have is 405 with ``Allow``."""

from __future__ import annotations

import re

import pytest

from tests.helpers import TWO_LINE_SPEC, bearer

pytestmark = pytest.mark.dialects

EXAMPLE_VALUES = {"job_id": "01JAAAAAAAAAAAAAAAAAAAAAAA", "name": "meta_init.json",
                  "sweep_id": "sw_01JAAAAAAAAAAAAAAAAAAAAAAA", "dataset_id": "ds_x", "key_id": "1"}


def operations(client) -> list[tuple[str, str, dict]]:  # noqa: ANN001
    document = client.get("/openapi.json").json()
    return [(method.upper(), path, operation)
            for path, by_method in document["paths"].items()
            for method, operation in by_method.items()]


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: EXAMPLE_VALUES.get(match.group(1), "x1"), path)


def test_every_secured_operation_documents_and_answers_401_without_a_key(client):
    secured = [(method, path, operation) for method, path, operation in operations(client)
               if operation.get("security")]
    assert len(secured) >= 20
    for method, path, operation in secured:
        assert "401" in operation["responses"], f"{method} {path}"
        body = {"json": {}} if "requestBody" in operation else {}
        response = client.request(method, concrete(path), **body)
        assert response.status_code == 401, f"{method} {path}: {response.status_code}"
        assert response.headers["www-authenticate"] == "Bearer"


def test_every_operation_documents_422_and_every_body_413(client):
    for method, path, operation in operations(client):
        assert "422" in operation["responses"], f"{method} {path}"
        if "requestBody" in operation:
            assert "413" in operation["responses"], f"{method} {path}"


def test_a_control_character_in_a_header_is_the_documented_422_on_any_route(client):
    response = client.get("/healthz", headers={"X-Anything": "a\x1bb"})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "x-anything"


def test_malformed_json_is_the_documented_422_naming_the_body(client, alice_key):
    response = client.post("/v1/jobs", content=b'{"algorithm": ',
                           headers={**bearer(alice_key), "Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["type"] == "json_invalid"


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/sweeps", "/v1/datasets"])
def test_an_empty_cursor_is_the_first_page(client, alice_key, path):
    headers = bearer(alice_key)
    client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=headers)
    first = client.get(path, headers=headers)
    empty = client.get(f"{path}?cursor=", headers=headers)
    assert empty.status_code == 200
    assert empty.json() == first.json()


@pytest.mark.parametrize(("path", "allow"), [
    ("/v1/jobs", "GET, OPTIONS, POST"),
    ("/v1/jobs/01JAAAAAAAAAAAAAAAAAAAAAAA", "GET, OPTIONS"),
    ("/v1/datasets/ds_x", "DELETE, GET, OPTIONS"),
    ("/healthz", "GET, OPTIONS"),
    ("/static/app.js", "GET, HEAD, OPTIONS")])
def test_options_answers_204_with_allow(client, path, allow):
    response = client.options(path)
    assert response.status_code == 204
    assert response.headers["allow"] == allow
    assert response.content == b""


def test_options_on_a_path_nothing_serves_is_404(client):
    assert client.options("/v1/nothing-here").status_code == 404


def test_a_method_a_path_does_not_have_is_405_with_allow(client, alice_key):
    response = client.put("/v1/jobs", headers=bearer(alice_key))
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
