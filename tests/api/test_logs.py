"""``GET /v1/jobs/{id}/logs`` on SQLite and PostgreSQL: records written through the service
layer as the dispatcher writes them; pages, the dropped-records marker, the owner scope, and
``follow=true`` over a real HTTP connection while records arrive."""

from __future__ import annotations

import time

import httpx
from fastapi.testclient import TestClient

from metaserve.service import job_logs, job_store
from metaserve.service.orm import JobStatus
from metaserve.client import parse_sse
from tests.helpers import claim, finish
from tests.helpers import submit_over_http as submit


def write(sessions, job_id: str, *messages: str, attempt: int = 1, keep: int = job_logs.MAX_LOG_RECORDS) -> int:  # noqa: ANN001
    with sessions() as session:
        return job_logs.add_log_records(session=session, job_id=job_id, attempt=attempt, keep=keep,
                                        records=[{"time": time.time(), "level": "INFO",
                                                  "source": "driver pid 1 metaserve.workers",
                                                  "message": message} for message in messages])


def test_a_jobs_log_pages_in_order_and_says_when_it_is_complete(client: TestClient, sessions,
                                                                 alice_auth) -> None:  # noqa: ANN001
    job_id = submit(client, alice_auth)
    claim(sessions)
    write(sessions, job_id, "one", "two")
    write(sessions, job_id, "three\nTraceback (most recent call last):\n  ...\nValueError: x")
    first = client.get(f"/v1/jobs/{job_id}/logs", params={"limit": 2}, headers=alice_auth).json()
    assert [(line["seq"], line["message"]) for line in first["data"]] == [(1, "one"), (2, "two")]
    assert (first["next_after"], first["complete"], first["status"], first["dropped"]) == (
        2, False, "running", 0)
    rest = client.get(f"/v1/jobs/{job_id}/logs", params={"after": 2}, headers=alice_auth).json()
    assert [line["seq"] for line in rest["data"]] == [3]
    assert rest["data"][0]["message"].endswith("ValueError: x")
    assert (rest["data"][0]["level"], rest["data"][0]["attempt"]) == ("INFO", 1)
    assert (rest["next_after"], rest["complete"]) == (3, True)


def test_past_the_cap_the_oldest_records_are_dropped_and_a_marker_says_how_many(
        client: TestClient, sessions, alice_auth) -> None:  # noqa: ANN001
    job_id = submit(client, alice_auth)
    claim(sessions)
    write(sessions, job_id, *[f"line {n}" for n in range(1, 8)], keep=5)
    write(sessions, job_id, "line 8", "line 9", keep=5)
    body = client.get(f"/v1/jobs/{job_id}/logs", headers=alice_auth).json()
    assert body["dropped"] == 4
    assert [line["message"] for line in body["data"]] == [
        "[4 earlier log records dropped: a job's log keeps its most recent records]",
        "line 5", "line 6", "line 7", "line 8", "line 9"]
    assert body["data"][0]["level"] == "WARNING"
    after_marker = client.get(f"/v1/jobs/{job_id}/logs", params={"after": 6},
                              headers=alice_auth).json()
    assert [line["message"] for line in after_marker["data"]] == ["line 7", "line 8", "line 9"]


def test_another_users_job_has_no_log_and_bad_parameters_are_named(
        client: TestClient, sessions, alice_auth, bob_auth) -> None:  # noqa: ANN001
    job_id = submit(client, alice_auth)
    claim(sessions)
    write(sessions, job_id, "secret")
    for params in ({}, {"follow": "true"}):
        response = client.get(f"/v1/jobs/{job_id}/logs", params=params, headers=bob_auth)
        assert response.status_code == 404, response.text
        assert "secret" not in response.text
    assert client.get(f"/v1/jobs/{job_id}/logs").status_code == 401
    response = client.get(f"/v1/jobs/{job_id}/logs", params={"after": -1}, headers=alice_auth)
    assert response.status_code == 422 and "after" in response.text
    response = client.get(f"/v1/jobs/{job_id}/logs", params={"limit": 0}, headers=alice_auth)
    assert response.status_code == 422 and "limit" in response.text


def test_follow_streams_new_records_as_they_are_written_and_ends_with_the_job(
        live_url: str, sessions, alice_auth) -> None:  # noqa: ANN001, F811
    with httpx.Client(base_url=live_url, headers=alice_auth, timeout=10) as http:
        job_id = submit(http, alice_auth)
        claim(sessions)
        write(sessions, job_id, "before")
        with http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = parse_sse(response.iter_lines())
            first = next(stream)
            write(sessions, job_id, "while following")    # only after the first arrived
            second = next(stream)
            write(sessions, job_id, "last words")
            finish(sessions, job_id, JobStatus.SUCCEEDED)
            rest = list(stream)
        assert [(e.kind, e.id, e.data["message"]) for e in (first, second)] == [
            ("log", "1", "before"), ("log", "2", "while following")]
        assert [(e.kind, e.data) for e in rest] == [
            ("log", {**rest[0].data, "message": "last words"}), ("end", {"status": "succeeded"})]
        # Resuming after an event id sends only what came after it.
        with http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"},
                         headers={"Last-Event-ID": "2"}) as response:
            resumed = list(parse_sse(response.iter_lines()))
        assert [e.data.get("message", e.data.get("status")) for e in resumed] == [
            "last words", "succeeded"]


def test_a_job_whose_log_was_never_written_reads_empty(client: TestClient, sessions,
                                                      alice_auth) -> None:  # noqa: ANN001
    job_id = submit(client, alice_auth)
    with sessions.begin() as session:
        job_store.request_cancel(session=session, job_id=job_id,
                                 owner=_owner(session, alice_auth))
    body = client.get(f"/v1/jobs/{job_id}/logs", headers=alice_auth).json()
    assert body == {"data": [], "next_after": 0, "dropped": 0, "status": "cancelled",
                    "complete": True}


def _owner(session, auth: dict[str, str]):  # noqa: ANN001, ANN202
    from metaserve.service import auth as service_auth

    return service_auth.authenticate(session=session, key=auth["Authorization"].split()[1])
