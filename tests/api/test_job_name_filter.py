"""``GET /v1/jobs?name=``: a case-insensitive substring of the job's name, applied by the
database before paging (so the cursor pages through the matches, not through a page of all
jobs), owner-scoped like the list, with ``%`` and ``_`` matching themselves; a bad value is a
422 naming ``name``. On SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.dialects  # case-insensitive matching differs between the dialects

SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}


def submit(client: TestClient, auth: dict[str, str], name: str) -> str:
    response = client.post("/v1/jobs", json={**SPEC, "name": name}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def names(client: TestClient, auth: dict[str, str], **params: object) -> tuple[list[str], str | None]:
    response = client.get("/v1/jobs", params=params, headers=auth)
    assert response.status_code == 200, response.text
    page = response.json()
    return [job["name"] for job in page["data"]], page["next_cursor"]


def test_name_filters_by_case_insensitive_substring_before_paging(
        client: TestClient, alice_auth) -> None:  # noqa: ANN001
    for name in ("sine-lr-0.01", "other-1", "SINE-lr-0.1", "other-2", "cos", "Über-Sine", "other-3"):
        submit(client, alice_auth, name)
    # newest first; 3 of the 7 match, so a page of 2 holds matches only and the cursor
    # leads to the third, even though the non-matching jobs lie between them
    first, cursor = names(client, alice_auth, name="sInE", limit=2)
    assert first == ["Über-Sine", "SINE-lr-0.1"]
    second, last = names(client, alice_auth, name="sInE", limit=2, cursor=cursor)
    assert (second, last) == (["sine-lr-0.01"], None)
    assert names(client, alice_auth, name="über")[0] == ["Über-Sine"]  # not only ASCII folds
    assert names(client, alice_auth, name="nothing")[0] == []
    assert names(client, alice_auth, name="other", status="queued", limit=100)[0] == [
        "other-3", "other-2", "other-1"]


def test_percent_and_underscore_match_themselves(client: TestClient, alice_auth) -> None:  # noqa: ANN001
    for name in ("lr_0.1", "lrx0.1", "100%-data", "100x-data"):
        submit(client, alice_auth, name)
    assert names(client, alice_auth, name="lr_")[0] == ["lr_0.1"]
    assert names(client, alice_auth, name="0%")[0] == ["100%-data"]


def test_name_sees_only_the_callers_jobs(client: TestClient, alice_auth, bob_auth,  # noqa: ANN001
                                        admin_auth) -> None:  # noqa: ANN001
    submit(client, alice_auth, "shared-name alice")
    submit(client, bob_auth, "shared-name bob")
    assert names(client, alice_auth, name="shared")[0] == ["shared-name alice"]
    assert names(client, bob_auth, name="SHARED")[0] == ["shared-name bob"]
    assert names(client, bob_auth, name="alice")[0] == []
    assert names(client, admin_auth, name="shared-name")[0] == ["shared-name bob",
                                                                 "shared-name alice"]


@pytest.mark.parametrize("value", ["", "x" * 201, "a\x01b"])
def test_a_bad_name_is_a_422_naming_the_field(client: TestClient, alice_auth, value: str) -> None:  # noqa: ANN001
    response = client.get("/v1/jobs", params={"name": value}, headers=alice_auth)
    assert response.status_code == 422, response.text
    assert [(d["field"], d["in"]) for d in response.json()["error"]["details"]] == [
        ("name", "query")]
